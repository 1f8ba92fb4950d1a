//! A finding: what the analysis (`crate::analysis`, `crate::heap::findings`) tells a person
//! about a process, with its numbers, a plain explanation and what to try.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How much a finding matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A number worth knowing; nothing looks wrong.
    Info,
    /// A pattern that wastes memory or time.
    Warning,
}

/// One finding with its numbers, a plain explanation and what to try.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// A stable identifier (`heap`, `arenas`, `mmap_churn`, `purge_churn`, `untouched`,
    /// `growth`, `fragmentation`).
    pub id: String,
    pub pid: u32,
    pub severity: Severity,
    pub title: String,
    pub numbers: BTreeMap<String, u64>,
    pub explanation: String,
    pub suggestion: Option<String>,
    /// With stacks: the call sites responsible, most memory first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub call_sites: Vec<String>,
}
