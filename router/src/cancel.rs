//! TODO(cancel)
