//! Message bodies the router decodes, each parser on the same arbitrary body: Authentication*,
//! ErrorResponse/NoticeResponse, ParameterStatus, BackendKeyData, NegotiateProtocolVersion and
//! ReadyForQuery (B); SASLInitialResponse, PasswordMessage and Query (F).
//!
//! Whatever parses must account for every byte of the body.
#![no_main]

use branchgate::protocol::backend::{
    sasl_mechanisms, Authentication, BackendKeyData, ErrorFields, NegotiateProtocolVersion,
    ParameterStatus, TransactionStatus,
};
use branchgate::protocol::frontend;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    match Authentication::parse(body) {
        Ok(Authentication::Sasl { mechanisms }) => {
            assert_eq!(mechanisms, &body[4..]);
            let mut rebuilt = Vec::new();
            for name in sasl_mechanisms(mechanisms) {
                rebuilt.extend_from_slice(name.as_bytes());
                rebuilt.push(0);
            }
            rebuilt.push(0);
            assert_eq!(
                rebuilt, mechanisms,
                "sasl_mechanisms skipped or invented bytes"
            );
        }
        Ok(Authentication::Md5Password { salt }) => assert_eq!(body[4..], salt),
        Ok(Authentication::SaslContinue(rest) | Authentication::SaslFinal(rest)) => {
            assert_eq!(rest, &body[4..]);
        }
        Ok(Authentication::Ok | Authentication::CleartextPassword) => assert_eq!(body.len(), 4),
        Ok(Authentication::Other(code)) => assert_eq!(body[..4], code.to_be_bytes()),
        Err(_) => {}
    }

    if let Ok(fields) = ErrorFields::parse(body) {
        assert_eq!(body.last(), Some(&0));
        for value in [fields.severity, fields.code, fields.message] {
            assert!(!value.contains('\0'));
        }
    }

    if let Ok(status) = ParameterStatus::parse(body) {
        assert_eq!(
            body,
            [status.name, "\0", status.value, "\0"].concat().as_bytes()
        );
    }

    if let Ok(key) = BackendKeyData::parse(body) {
        assert_eq!(body[..4], key.pid.to_be_bytes());
        assert_eq!(body[4..], key.secret.to_be_bytes());
    }

    if let Ok(negotiate) = NegotiateProtocolVersion::parse(body) {
        let names: Vec<&str> = negotiate.unsupported().collect();
        assert_eq!(names.len() as u64, u64::from(negotiate.unsupported_count));
        let rebuilt: usize = names.iter().map(|n| n.len() + 1).sum();
        assert_eq!(rebuilt + 8, body.len());
    }

    if let Ok(status) = TransactionStatus::parse(body) {
        assert_eq!(body, [status.byte()]);
    }

    if let Ok(initial) = frontend::SaslInitialResponse::parse(body) {
        assert!(initial.mechanism.len() + 1 + 4 + initial.data.len() == body.len());
    }
    if let Ok(password) = frontend::password(body) {
        assert_eq!(password.len() + 1, body.len());
    }
    if let Ok(sql) = frontend::query(body) {
        assert_eq!(sql.len() + 1, body.len());
    }
});
