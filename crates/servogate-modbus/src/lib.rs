//! Modbus RTU for servogate.
pub mod timing;
