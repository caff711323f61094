//! servogate-mqtt
