//! Test support: real PostgreSQL servers, certificates, and the router in-process.
