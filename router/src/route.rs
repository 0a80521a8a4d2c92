//! TODO(route)
