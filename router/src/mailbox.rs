//! TODO(mailbox)
