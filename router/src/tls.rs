//! TODO(tls)
