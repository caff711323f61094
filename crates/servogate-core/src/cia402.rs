//! CiA 402 drive state from the statusword (CiA 402-2, table "State coding").

/// The states of the CiA 402 power drive state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DriveState {
    NotReadyToSwitchOn,
    SwitchOnDisabled,
    ReadyToSwitchOn,
    SwitchedOn,
    OperationEnabled,
    QuickStopActive,
    FaultReactionActive,
    Fault,
}

impl DriveState {
    /// Decodes the statusword's state bits: 0 ready to switch on, 1 switched on,
    /// 2 operation enabled, 3 fault, 5 quick stop, 6 switch on disabled. Every statusword
    /// maps to a state, so bytes from a drive never fail to decode.
    pub fn from_statusword(sw: u16) -> Self {
        // Mask xxxx xxxx x0xx 0000 / x1xx 1111 pairs from the standard's table.
        match (sw & 0x004F, sw & 0x006F) {
            (0x0000, _) => Self::NotReadyToSwitchOn,
            (0x0040, _) => Self::SwitchOnDisabled,
            (_, 0x0021) => Self::ReadyToSwitchOn,
            (_, 0x0023) => Self::SwitchedOn,
            (_, 0x0027) => Self::OperationEnabled,
            (_, 0x0007) => Self::QuickStopActive,
            (0x000F, _) => Self::FaultReactionActive,
            (0x0008, _) => Self::Fault,
            // Bit patterns the table leaves undefined: a fault bit wins, else the drive is
            // not in a usable state.
            _ if sw & 0x0008 != 0 => Self::Fault,
            _ => Self::NotReadyToSwitchOn,
        }
    }

    /// The name used on MQTT.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotReadyToSwitchOn => "not_ready_to_switch_on",
            Self::SwitchOnDisabled => "switch_on_disabled",
            Self::ReadyToSwitchOn => "ready_to_switch_on",
            Self::SwitchedOn => "switched_on",
            Self::OperationEnabled => "operation_enabled",
            Self::QuickStopActive => "quick_stop_active",
            Self::FaultReactionActive => "fault_reaction_active",
            Self::Fault => "fault",
        }
    }

    /// True in the two fault states.
    pub fn is_fault(self) -> bool {
        matches!(self, Self::Fault | Self::FaultReactionActive)
    }
}

/// How long a CiA 402 transition (or a set-point acknowledge) may take before a command
/// that asked for it is `failed` (`wrong_state`).
pub const TRANSITION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a `move` with `wait = "target_reached"` may take to arrive.
pub const REACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Modes of operation (object 0x6060): profile position.
pub const MODE_PROFILE_POSITION: i8 = 1;
/// Modes of operation: profile velocity.
pub const MODE_PROFILE_VELOCITY: i8 = 3;

/// CiA 402-2 controlword commands (object 0x6040, "device control commands").
pub mod controlword {
    /// Shutdown: -> ready to switch on.
    pub const SHUTDOWN: u16 = 0x0006;
    /// Switch on: -> switched on.
    pub const SWITCH_ON: u16 = 0x0007;
    /// Enable operation: -> operation enabled.
    pub const ENABLE_OPERATION: u16 = 0x000F;
    /// Disable voltage: -> switch on disabled.
    pub const DISABLE_VOLTAGE: u16 = 0x0000;
    /// Quick stop: -> quick stop active (or switch on disabled).
    pub const QUICK_STOP: u16 = 0x0002;
    /// Bit 4 in profile position mode: new set-point.
    pub const NEW_SET_POINT: u16 = 0x0010;
    /// Bit 6 in profile position mode: the target is relative.
    pub const RELATIVE: u16 = 0x0040;
    /// Bit 7: fault reset, on its rising edge.
    pub const FAULT_RESET: u16 = 0x0080;
    /// Bit 8: halt.
    pub const HALT: u16 = 0x0100;
}

/// CiA 402-2 statusword bits (object 0x6041).
pub mod statusword {
    /// Bit 10: target reached.
    pub const TARGET_REACHED: u16 = 0x0400;
    /// Bit 12 in profile position mode: set-point acknowledge.
    pub const SET_POINT_ACK: u16 = 0x1000;
}

/// Where a command drives the power drive state machine: the same table on every bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// `enable`: operation enabled.
    Enabled,
    /// `disable`: the power stage off.
    Disabled,
    /// `quick_stop`: stopped (quick stop active, or a state without motion).
    Stopped,
    /// `fault_reset`: out of the fault states.
    NoFault,
}

impl Goal {
    /// True when a drive in state `s` is where the goal asks.
    pub fn reached(self, s: DriveState) -> bool {
        use DriveState::*;
        match self {
            Self::Enabled => s == OperationEnabled,
            Self::Disabled => matches!(
                s,
                ReadyToSwitchOn | SwitchOnDisabled | NotReadyToSwitchOn | Fault
            ),
            Self::Stopped => !matches!(s, OperationEnabled | SwitchedOn | ReadyToSwitchOn),
            Self::NoFault => !s.is_fault(),
        }
    }

    /// The controlword that moves a drive in state `s` toward the goal (CiA 402-2 state
    /// transitions); `None`: wait for the drive; `Err`: the goal cannot be reached from
    /// there.
    pub fn next(self, s: DriveState) -> Result<Option<u16>, &'static str> {
        use controlword::*;
        use DriveState::*;
        Ok(match (self, s) {
            (Self::Enabled, SwitchOnDisabled) => Some(SHUTDOWN),
            (Self::Enabled, ReadyToSwitchOn) => Some(SWITCH_ON),
            (Self::Enabled, SwitchedOn) => Some(ENABLE_OPERATION),
            (Self::Enabled, QuickStopActive) => Some(DISABLE_VOLTAGE),
            (Self::Enabled, Fault | FaultReactionActive) => {
                return Err("the drive is in fault: send fault_reset first")
            }
            (Self::Disabled, SwitchedOn | OperationEnabled) => Some(SHUTDOWN),
            (Self::Disabled, QuickStopActive) => Some(DISABLE_VOLTAGE),
            (Self::Stopped, _) => Some(QUICK_STOP),
            _ => None,
        })
    }

    /// The goal in words, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Enabled => "operation_enabled",
            Self::Disabled => "a disabled state",
            Self::Stopped => "quick_stop_active",
            Self::NoFault => "a state without fault",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DriveState::{self, *};

    #[test]
    fn statusword_table_decodes_every_state() {
        // Known answers from CiA 402-2 (also listed in the CANopenNode CiA 402 examples).
        let cases = [
            (0x0000, NotReadyToSwitchOn),
            (0x0250, SwitchOnDisabled),
            (0x0231, ReadyToSwitchOn),
            (0x0233, SwitchedOn),
            (0x0237, OperationEnabled),
            (0x0217, QuickStopActive),
            (0x021F, FaultReactionActive),
            (0x0218, Fault),
        ];
        for (sw, state) in cases {
            assert_eq!(
                DriveState::from_statusword(sw),
                state,
                "statusword {sw:#06x}"
            );
        }
    }

    #[test]
    fn enable_walks_every_state_to_operation_enabled_and_refuses_a_fault() {
        use super::{controlword::*, Goal};
        let path = [
            (SwitchOnDisabled, SHUTDOWN),
            (ReadyToSwitchOn, SWITCH_ON),
            (SwitchedOn, ENABLE_OPERATION),
            (QuickStopActive, DISABLE_VOLTAGE),
        ];
        for (state, word) in path {
            assert_eq!(Goal::Enabled.next(state), Ok(Some(word)), "{state:?}");
        }
        assert!(Goal::Enabled.reached(OperationEnabled));
        assert!(Goal::Enabled.next(Fault).is_err());
        assert_eq!(Goal::Enabled.next(NotReadyToSwitchOn), Ok(None));
    }

    #[test]
    fn a_quick_stop_is_written_from_every_state_and_reached_without_motion() {
        use super::{controlword::QUICK_STOP, Goal};
        for sw in 0..=u16::MAX {
            let s = DriveState::from_statusword(sw);
            assert_eq!(Goal::Stopped.next(s), Ok(Some(QUICK_STOP)));
        }
        assert!(Goal::Stopped.reached(QuickStopActive));
        assert!(!Goal::Stopped.reached(OperationEnabled));
    }

    #[test]
    fn any_statusword_with_an_undefined_pattern_still_decodes() {
        for sw in 0..=u16::MAX {
            let _ = DriveState::from_statusword(sw).as_str();
        }
        assert_eq!(DriveState::from_statusword(0x0009), Fault);
    }
}
