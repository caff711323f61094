//! The SocketCAN bus task: one task owns one CAN interface and drives a
//! [`servogate_canopen::Master`] with the frames it reads and the timers it asks for.
#![forbid(unsafe_code)]
