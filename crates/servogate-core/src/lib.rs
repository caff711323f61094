//! servogate-core
