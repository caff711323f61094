//! Read planning: merge the fields of a device into as few reads as possible.
//!
//! Fields of one register table are sorted by address and merged into a block while the
//! block stays within `max_registers` (125, the most a 03/04 read may ask for: Modbus
//! Application Protocol V1.1b3, section 6.3) and the hole between two fields is at most
//! `max_gap` registers. Reading a hole is cheaper than a second transaction (a transaction
//! costs 13 characters plus two t3.5; a register costs two characters), but some devices
//! answer 02 Illegal Data Address for a read that touches an unmapped register. Then the
//! block is split in two and the split is remembered for the life of the plan.

use crate::profile::{Field, RegisterKind};

/// Most registers one 03/04 request may read.
pub const MAX_READ_REGISTERS: u16 = 125;

/// One read request of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
    /// Indices into the profile's fields, in address order.
    pub fields: Vec<usize>,
}

/// What to do after a block answered Illegal Data Address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitOutcome {
    /// The block was split; the plan now holds its halves.
    Split,
    /// The block holds one field: the device does not have it. The block is removed from
    /// the plan; the field's name is returned so it can be reported once.
    Unreadable(Vec<usize>),
}

/// The reads of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    pub blocks: Vec<Block>,
}

impl ReadPlan {
    /// Plans the reads for `fields`.
    pub fn new(fields: &[Field], max_gap: u16, max_registers: u16) -> Self {
        let max_registers = max_registers.clamp(1, MAX_READ_REGISTERS);
        let mut order: Vec<usize> = (0..fields.len()).collect();
        order.sort_by_key(|&i| (fields[i].kind, fields[i].address));
        let mut blocks: Vec<Block> = Vec::new();
        for i in order {
            let f = &fields[i];
            let f_end = f.end();
            if let Some(b) = blocks.last_mut() {
                let b_end = u32::from(b.start) + u32::from(b.count);
                let gap_ok = u32::from(f.address) <= b_end + u32::from(max_gap);
                let new_end = b_end.max(f_end);
                let len_ok = new_end - u32::from(b.start) <= u32::from(max_registers);
                if b.kind == f.kind && gap_ok && len_ok {
                    b.count = (new_end - u32::from(b.start)) as u16;
                    b.fields.push(i);
                    continue;
                }
            }
            blocks.push(Block {
                kind: f.kind,
                start: f.address,
                count: f.data_type.registers(),
                fields: vec![i],
            });
        }
        Self { blocks }
    }

    /// Block `index` answered Illegal Data Address: split it between its fields (halves by
    /// field count), or drop it when it holds a single field.
    pub fn split(&mut self, index: usize, fields: &[Field]) -> SplitOutcome {
        let block = self.blocks[index].clone();
        if block.fields.len() <= 1 {
            self.blocks.remove(index);
            return SplitOutcome::Unreadable(block.fields);
        }
        let mid = block.fields.len() / 2;
        let make = |idx: &[usize]| {
            let start = idx.iter().map(|&i| fields[i].address).min().unwrap_or(0);
            let end = idx.iter().map(|&i| fields[i].end()).max().unwrap_or(0);
            Block {
                kind: block.kind,
                start,
                count: (end - u32::from(start)) as u16,
                fields: idx.to_vec(),
            }
        };
        let (a, b) = block.fields.split_at(mid);
        self.blocks.splice(index..=index, [make(a), make(b)]);
        SplitOutcome::Split
    }

    /// Total registers read per poll.
    pub fn registers(&self) -> u32 {
        self.blocks.iter().map(|b| u32::from(b.count)).sum()
    }
}

/// The registers of field `f` inside a block's reply.
pub fn field_registers<'a>(block: &Block, f: &Field, reply: &'a [u16]) -> Option<&'a [u16]> {
    let from = usize::from(f.address.checked_sub(block.start)?);
    reply.get(from..from + usize::from(f.data_type.registers()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::DataType;

    fn f(addr: u16, t: DataType) -> Field {
        Field::new("f", addr, t)
    }

    #[test]
    fn adjacent_fields_merge_into_one_read() {
        let fields = [
            f(0, DataType::I32),
            f(2, DataType::I32),
            f(4, DataType::U16),
        ];
        let plan = ReadPlan::new(&fields, 0, 125);
        assert_eq!(plan.blocks.len(), 1);
        assert_eq!((plan.blocks[0].start, plan.blocks[0].count), (0, 5));
    }

    #[test]
    fn a_gap_larger_than_allowed_starts_a_new_read() {
        let fields = [f(0, DataType::U16), f(10, DataType::U16)];
        assert_eq!(ReadPlan::new(&fields, 8, 125).blocks.len(), 2);
        assert_eq!(ReadPlan::new(&fields, 9, 125).blocks.len(), 1);
    }

    #[test]
    fn a_read_never_exceeds_125_registers() {
        let fields: Vec<Field> = (0..300).map(|a| f(a, DataType::U16)).collect();
        let plan = ReadPlan::new(&fields, 0, 500);
        assert!(plan.blocks.iter().all(|b| b.count <= 125));
        assert_eq!(plan.registers(), 300);
        assert_eq!(plan.blocks.len(), 3);
    }

    #[test]
    fn holding_and_input_registers_never_share_a_read() {
        let mut input = f(1, DataType::U16);
        input.kind = RegisterKind::Input;
        let fields = [f(0, DataType::U16), input];
        assert_eq!(ReadPlan::new(&fields, 10, 125).blocks.len(), 2);
    }

    #[test]
    fn fields_out_of_order_in_the_profile_are_planned_by_address() {
        let fields = [f(4, DataType::U16), f(0, DataType::I32)];
        let plan = ReadPlan::new(&fields, 2, 125);
        assert_eq!(plan.blocks[0].fields, vec![1, 0]);
        assert_eq!(plan.blocks[0].count, 5);
        let reply = [0, 7, 0, 0, 9];
        assert_eq!(
            field_registers(&plan.blocks[0], &fields[0], &reply),
            Some(&[9][..])
        );
    }

    #[test]
    fn illegal_address_splits_a_block_until_single_fields_remain() {
        let fields = [
            f(0, DataType::U16),
            f(0x20, DataType::U16),
            f(0x40, DataType::U16),
        ];
        let mut plan = ReadPlan::new(&fields, 0x40, 125);
        assert_eq!(plan.blocks.len(), 1);
        assert_eq!(plan.split(0, &fields), SplitOutcome::Split);
        assert_eq!(plan.blocks.len(), 2);
        assert_eq!((plan.blocks[0].start, plan.blocks[0].count), (0, 1));
        assert_eq!((plan.blocks[1].start, plan.blocks[1].count), (0x20, 0x21));
        assert_eq!(plan.split(0, &fields), SplitOutcome::Unreadable(vec![0]));
        assert_eq!(plan.blocks.len(), 1);
    }
}
