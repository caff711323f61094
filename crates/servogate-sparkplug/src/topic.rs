//! The Sparkplug B topic namespace (Eclipse Sparkplug 3.0, chapter 4):
//! `spBv1.0/{group_id}/{message_type}/{edge_node_id}[/{device_id}]`, and
//! `spBv1.0/STATE/{host_id}` for a host application's state.

use std::fmt;

/// The namespace element of every Sparkplug B topic.
pub const NAMESPACE: &str = "spBv1.0";

/// The message types of an edge node and its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    NBirth,
    NDeath,
    DBirth,
    DDeath,
    NData,
    DData,
    NCmd,
    DCmd,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NBirth => "NBIRTH",
            Self::NDeath => "NDEATH",
            Self::DBirth => "DBIRTH",
            Self::DDeath => "DDEATH",
            Self::NData => "NDATA",
            Self::DData => "DDATA",
            Self::NCmd => "NCMD",
            Self::DCmd => "DCMD",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "NBIRTH" => Self::NBirth,
            "NDEATH" => Self::NDeath,
            "DBIRTH" => Self::DBirth,
            "DDEATH" => Self::DDeath,
            "NDATA" => Self::NData,
            "DDATA" => Self::DData,
            "NCMD" => Self::NCmd,
            "DCMD" => Self::DCmd,
            _ => return None,
        })
    }

    /// True for the message types of a device (a device id follows the node's).
    pub fn is_device(self) -> bool {
        matches!(self, Self::DBirth | Self::DDeath | Self::DData | Self::DCmd)
    }
}

/// A topic of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Node {
        group: String,
        kind: MessageType,
        node: String,
    },
    Device {
        group: String,
        kind: MessageType,
        node: String,
        device: String,
    },
    /// A host application's STATE.
    State { host: String },
}

/// Why an id cannot be a Sparkplug id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} {id:?} cannot be a Sparkplug id: {why}")]
pub struct BadId {
    pub what: &'static str,
    pub id: String,
    pub why: &'static str,
}

/// Checks a group, edge node, device or host id: UTF-8 (given), not empty, none of the
/// MQTT topic's reserved characters `/ + #` (Sparkplug 3.0, 4.1.1).
pub fn check_id(what: &'static str, id: &str) -> Result<(), BadId> {
    let bad = |why| {
        Err(BadId {
            what,
            id: id.to_owned(),
            why,
        })
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.contains(['/', '+', '#']) {
        return bad("it holds '/', '+' or '#'");
    }
    Ok(())
}

impl Topic {
    /// A topic of the edge node `node` in `group`.
    pub fn node(group: &str, kind: MessageType, node: &str) -> Self {
        Self::Node {
            group: group.to_owned(),
            kind,
            node: node.to_owned(),
        }
    }

    /// A topic of `device` of the edge node.
    pub fn device(group: &str, kind: MessageType, node: &str, device: &str) -> Self {
        Self::Device {
            group: group.to_owned(),
            kind,
            node: node.to_owned(),
            device: device.to_owned(),
        }
    }

    /// Reads a topic of the namespace; `None` for anything else.
    pub fn parse(topic: &str) -> Option<Self> {
        let mut parts = topic.split('/');
        if parts.next()? != NAMESPACE {
            return None;
        }
        let group = parts.next()?;
        let second = parts.next()?;
        if group == "STATE" {
            return match parts.next() {
                None if !second.is_empty() => Some(Self::State {
                    host: second.to_owned(),
                }),
                _ => None,
            };
        }
        let kind = MessageType::parse(second)?;
        let node = parts.next()?;
        let device = parts.next();
        if parts.next().is_some() || group.is_empty() || node.is_empty() {
            return None;
        }
        match (kind.is_device(), device) {
            (false, None) => Some(Self::node(group, kind, node)),
            (true, Some(d)) if !d.is_empty() => Some(Self::device(group, kind, node, d)),
            _ => None,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node { group, kind, node } => {
                write!(f, "{NAMESPACE}/{group}/{}/{node}", kind.as_str())
            }
            Self::Device {
                group,
                kind,
                node,
                device,
            } => write!(f, "{NAMESPACE}/{group}/{}/{node}/{device}", kind.as_str()),
            Self::State { host } => write!(f, "{NAMESPACE}/STATE/{host}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tck_id_topic_structure_namespace_and_message_types() {
        let t = Topic::device("plant-1", MessageType::DData, "cell-7", "axis-3");
        assert_eq!(t.to_string(), "spBv1.0/plant-1/DDATA/cell-7/axis-3");
        assert_eq!(Topic::parse(&t.to_string()), Some(t));
        let n = Topic::node("plant-1", MessageType::NBirth, "cell-7");
        assert_eq!(n.to_string(), "spBv1.0/plant-1/NBIRTH/cell-7");
        assert_eq!(
            Topic::parse("spBv1.0/STATE/scada"),
            Some(Topic::State {
                host: "scada".into()
            })
        );
        for bad in [
            "spAv1.0/g/NBIRTH/n",
            "spBv1.0/g/NBIRTH/n/d",
            "spBv1.0/g/DDATA/n",
            "spBv1.0/g/XDATA/n",
            "spBv1.0//NDATA/n",
            "spBv1.0/g/DDATA/n/d/extra",
            "spBv1.0/STATE/",
        ] {
            assert_eq!(Topic::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ids_may_not_hold_topic_separators_or_wildcards() {
        assert!(check_id("group_id", "plant-1").is_ok());
        for bad in ["", "a/b", "a+", "#"] {
            assert!(check_id("device", bad).is_err(), "{bad:?}");
        }
    }
}
