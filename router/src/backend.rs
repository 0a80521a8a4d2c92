//! TODO(backend)
