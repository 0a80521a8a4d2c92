//! TODO(role)
