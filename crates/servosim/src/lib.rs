//! servosim placeholder
