//! end-to-end test support
