//! The CiA 402 drive state machine (CiA 402-2, "device control"), shared by both buses:
//! the CANopen nodes drive it through object 0x6040, the Modbus units through register
//! 0x0012. States, their statusword codings, the controlword's command coding and the
//! transition table; no time, no motion.

/// The CiA 402 states a simulated drive can be in. Not ready to switch on and Fault
/// reaction active are passed through at once, so they never show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cia402State {
    SwitchOnDisabled,
    ReadyToSwitchOn,
    SwitchedOn,
    OperationEnabled,
    QuickStopActive,
    Fault,
}

/// Statusword bit 4: voltage enabled. Bit 9: remote (controlled over the network). Set in
/// every state, as the simulators have always shown them.
pub const SW_VOLTAGE_ENABLED_REMOTE: u16 = 0x0210;

impl Cia402State {
    /// The statusword: the state coding of CiA 402-2 (bits 0-3, 5, 6) plus voltage
    /// enabled and remote.
    pub fn statusword(self) -> u16 {
        let coding = match self {
            // x1xx 0000
            Cia402State::SwitchOnDisabled => 0x0040,
            // x01x 0001
            Cia402State::ReadyToSwitchOn => 0x0021,
            // x01x 0011
            Cia402State::SwitchedOn => 0x0023,
            // x01x 0111
            Cia402State::OperationEnabled => 0x0027,
            // x00x 0111
            Cia402State::QuickStopActive => 0x0007,
            // x0xx 1000
            Cia402State::Fault => 0x0008,
        };
        coding | SW_VOLTAGE_ENABLED_REMOTE
    }

    /// The state's name in servogate's events (DESIGN.md section 2).
    pub fn name(self) -> &'static str {
        match self {
            Cia402State::SwitchOnDisabled => "switch_on_disabled",
            Cia402State::ReadyToSwitchOn => "ready_to_switch_on",
            Cia402State::SwitchedOn => "switched_on",
            Cia402State::OperationEnabled => "operation_enabled",
            Cia402State::QuickStopActive => "quick_stop_active",
            Cia402State::Fault => "fault",
        }
    }
}

/// Modes of operation 1: profile position (CiA 402-2, object 0x6060).
pub const MODE_PROFILE_POSITION: i8 = 1;
/// Modes of operation 3: profile velocity.
pub const MODE_PROFILE_VELOCITY: i8 = 3;
/// Modes of operation 8: cyclic synchronous position, the simulators' start mode.
pub const MODE_CYCLIC_SYNC_POSITION: i8 = 8;
/// The modes of operation (0x6060) the simulated drives accept: profile position (1),
/// profile velocity (3), profile torque (4), homing (6), interpolated position (7),
/// cyclic synchronous position (8), velocity (9) and torque (10). Any other value is
/// refused (SDO abort 0x06090030 on CANopen, exception 03 on Modbus).
pub const SUPPORTED_MODES: [i8; 8] = [1, 3, 4, 6, 7, 8, 9, 10];

/// True when `mode` (as a Modbus register or a CANopen i8 carries it) is one of
/// [`SUPPORTED_MODES`].
pub fn is_supported_mode(mode: i16) -> bool {
    i8::try_from(mode).is_ok_and(|m| SUPPORTED_MODES.contains(&m))
}

/// Controlword bits (CiA 402-2, object 0x6040).
pub mod cw {
    pub const SWITCH_ON: u16 = 0x0001;
    pub const ENABLE_VOLTAGE: u16 = 0x0002;
    /// Active low: 0 commands a quick stop.
    pub const QUICK_STOP: u16 = 0x0004;
    pub const ENABLE_OPERATION: u16 = 0x0008;
    /// Profile position mode: a rising edge starts a new set-point.
    pub const NEW_SET_POINT: u16 = 0x0010;
    /// Profile position mode: the target is relative (here: to the present position).
    pub const RELATIVE: u16 = 0x0040;
    /// Rising edge in Fault: fault reset.
    pub const FAULT_RESET: u16 = 0x0080;
    /// 1 = the axis stops (and, in profile position mode, continues on 0).
    pub const HALT: u16 = 0x0100;
    /// The controlword a PLC leaves in a drive it enabled: the enable operation command.
    pub const ENABLED: u16 = SWITCH_ON | ENABLE_VOLTAGE | QUICK_STOP | ENABLE_OPERATION;
}

/// A device control command decoded from the controlword (CiA 402-2, "command coding").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0xxx x110
    Shutdown,
    /// 0xxx 0111: switch on, or disable operation.
    SwitchOn,
    /// 0xxx 1111: enable operation, or switch on + enable operation.
    EnableOperation,
    /// 0xxx xx0x
    DisableVoltage,
    /// 0xxx x01x
    QuickStop,
}

/// The command a controlword carries; `None` with bit 7 (fault reset) set.
pub fn decode(controlword: u16) -> Option<Command> {
    if controlword & cw::FAULT_RESET != 0 {
        // Every command has bit 7 = 0; with it set only its rising edge (fault reset)
        // means anything.
        return None;
    }
    if controlword & cw::ENABLE_VOLTAGE == 0 {
        return Some(Command::DisableVoltage);
    }
    if controlword & cw::QUICK_STOP == 0 {
        return Some(Command::QuickStop);
    }
    Some(if controlword & cw::SWITCH_ON == 0 {
        Command::Shutdown
    } else if controlword & cw::ENABLE_OPERATION != 0 {
        Command::EnableOperation
    } else {
        Command::SwitchOn
    })
}

/// The transition a command causes (CiA 402-2 state machine; transition numbers in the
/// comments). Fault is left only by a fault reset, handled apart.
pub fn transition(state: Cia402State, command: Command) -> Cia402State {
    use Cia402State::*;
    use Command::*;
    match (state, command) {
        (Fault, _) => Fault,
        (SwitchOnDisabled, Shutdown) => ReadyToSwitchOn, // 2
        (SwitchOnDisabled, _) => SwitchOnDisabled,
        (ReadyToSwitchOn, SwitchOn) => SwitchedOn, // 3
        (ReadyToSwitchOn, EnableOperation) => OperationEnabled, // 3 + 4
        (ReadyToSwitchOn, DisableVoltage | QuickStop) => SwitchOnDisabled, // 7
        (ReadyToSwitchOn, Shutdown) => ReadyToSwitchOn,
        (SwitchedOn, Shutdown) => ReadyToSwitchOn, // 6
        (SwitchedOn, EnableOperation) => OperationEnabled, // 4
        (SwitchedOn, DisableVoltage | QuickStop) => SwitchOnDisabled, // 10
        (SwitchedOn, SwitchOn) => SwitchedOn,
        (OperationEnabled, SwitchOn) => SwitchedOn, // 5
        (OperationEnabled, Shutdown) => ReadyToSwitchOn, // 8
        (OperationEnabled, DisableVoltage) => SwitchOnDisabled, // 9
        (OperationEnabled, QuickStop) => QuickStopActive, // 11
        (OperationEnabled, EnableOperation) => OperationEnabled,
        (QuickStopActive, DisableVoltage) => SwitchOnDisabled, // 12
        (QuickStopActive, EnableOperation) => OperationEnabled, // 16
        (QuickStopActive, _) => QuickStopActive,
    }
}

/// What a controlword write does to a drive in `state` whose controlword was `previous`:
/// the fault reset on the rising edge of bit 7 in Fault (transition 15), else the
/// command's transition. Nothing leaves Fault but the reset.
pub fn on_controlword(state: Cia402State, previous: u16, value: u16) -> Cia402State {
    let rising_fault_reset = value & cw::FAULT_RESET != 0 && previous & cw::FAULT_RESET == 0;
    match (state, decode(value)) {
        (Cia402State::Fault, _) if rising_fault_reset => Cia402State::SwitchOnDisabled,
        (Cia402State::Fault, _) | (_, None) => state,
        (_, Some(command)) => transition(state, command),
    }
}

#[cfg(test)]
mod tests {
    use super::Cia402State::*;
    use super::*;

    const ALL: [Cia402State; 6] = [
        SwitchOnDisabled,
        ReadyToSwitchOn,
        SwitchedOn,
        OperationEnabled,
        QuickStopActive,
        Fault,
    ];

    #[test]
    fn the_statusword_of_each_state_decodes_to_that_state_under_the_cia402_masks() {
        // CiA 402-2 state coding: (mask, value) over the statusword.
        for (state, mask, value) in [
            (SwitchOnDisabled, 0x4F, 0x40),
            (ReadyToSwitchOn, 0x6F, 0x21),
            (SwitchedOn, 0x6F, 0x23),
            (OperationEnabled, 0x6F, 0x27),
            (QuickStopActive, 0x6F, 0x07),
            (Fault, 0x4F, 0x08),
        ] {
            assert_eq!(state.statusword() & mask, value, "{state:?}");
            assert_eq!(state.statusword() & 0x0210, 0x0210, "{state:?}");
        }
        assert_eq!(
            ALL.map(Cia402State::statusword),
            [0x0250, 0x0231, 0x0233, 0x0237, 0x0217, 0x0218]
        );
    }

    #[test]
    fn the_documented_controlwords_decode_to_their_commands() {
        // CiA 402-2 command coding, with the values the gateway writes.
        for (value, command) in [
            (0x0006, Some(Command::Shutdown)),
            (0x0007, Some(Command::SwitchOn)),
            (0x000F, Some(Command::EnableOperation)),
            (0x0000, Some(Command::DisableVoltage)),
            (0x0002, Some(Command::QuickStop)),
            (0x000B, Some(Command::QuickStop)),
            // Halt, new set-point and relative do not change the command.
            (0x011F, Some(Command::EnableOperation)),
            (0x005F, Some(Command::EnableOperation)),
            (0x0080, None),
            (0x008F, None),
        ] {
            assert_eq!(decode(value), command, "{value:#06x}");
        }
    }

    #[test]
    fn each_command_from_each_state_gives_the_cia402_transition() {
        // Given every state and every command (rows: states in ALL's order;
        // columns: shutdown, switch on, enable operation, disable voltage, quick stop)
        #[rustfmt::skip]
        let table = [
            // SwitchOnDisabled: only shutdown (2) leaves it.
            [ReadyToSwitchOn, SwitchOnDisabled, SwitchOnDisabled, SwitchOnDisabled, SwitchOnDisabled],
            // ReadyToSwitchOn: 3, 3 + 4, 7, 7.
            [ReadyToSwitchOn, SwitchedOn, OperationEnabled, SwitchOnDisabled, SwitchOnDisabled],
            // SwitchedOn: 6, -, 4, 10, 10.
            [ReadyToSwitchOn, SwitchedOn, OperationEnabled, SwitchOnDisabled, SwitchOnDisabled],
            // OperationEnabled: 8, 5 (disable operation), -, 9, 11.
            [ReadyToSwitchOn, SwitchedOn, OperationEnabled, SwitchOnDisabled, QuickStopActive],
            // QuickStopActive: stays, stays, 16, 12, stays.
            [QuickStopActive, QuickStopActive, OperationEnabled, SwitchOnDisabled, QuickStopActive],
            // Fault: no command leaves it.
            [Fault, Fault, Fault, Fault, Fault],
        ];
        for (state, row) in ALL.into_iter().zip(table) {
            for (value, want) in [0x0006, 0x0007, 0x000F, 0x0000, 0x0002]
                .into_iter()
                .zip(row)
            {
                // When the controlword is written (bit 7 clear before and after)
                // Then the drive is in the table's state
                assert_eq!(
                    on_controlword(state, 0, value),
                    want,
                    "{state:?} + {value:#06x}"
                );
            }
        }
    }

    #[test]
    fn only_a_rising_bit_7_in_fault_resets_it_to_switch_on_disabled() {
        assert_eq!(on_controlword(Fault, 0x0000, 0x0080), SwitchOnDisabled);
        assert_eq!(on_controlword(Fault, 0x000F, 0x008F), SwitchOnDisabled);
        // No edge: bit 7 was already set
        assert_eq!(on_controlword(Fault, 0x0080, 0x0080), Fault);
        // Outside Fault, bit 7 carries no command
        for state in ALL.into_iter().filter(|&s| s != Fault) {
            assert_eq!(on_controlword(state, 0, 0x0086), state, "{state:?}");
        }
    }
}
