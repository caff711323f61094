//! servogate
