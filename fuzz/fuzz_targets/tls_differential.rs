//! The record layer against rustls itself (`branchgate::tls::differential`): the input decodes
//! into a client's behaviour after a TLS 1.3 or 1.2 handshake, in any suite the router offers
//! (records of any content type, inner plaintext, padding, header and additional data;
//! KeyUpdates and alerts; splits, bit flips, sequence numbers moved), fed to rustls's buffered
//! `ServerConnection` and to the router's `ServerHandshake` + `RecordLayer`. They must deliver
//! the same plaintext, see the same close_notify, fail at the same point with the same alert,
//! and seal the same records. The input layout is in the module's documentation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| branchgate::tls::differential::run(data));
