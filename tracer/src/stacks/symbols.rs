//! Naming the frames of an unwound stack with blazesym: function, `file:line` where the
//! module has DWARF (its own or a debug link), `module+offset` where it has no symbol,
//! `[anon]+offset` in anonymous executable memory. Each file is read through the descriptor
//! the unwinder keeps open, so a file deleted or replaced since it was mapped, or one in
//! another mount namespace, is the file the process ran.

use std::{collections::BTreeMap, sync::Arc};

use blazesym::symbolize::{
    CodeInfo, Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use super::{
    Frame,
    unwind::{ModuleFile, Unwound},
};

/// The blazesym symbolizer (it caches each file's symbols and DWARF).
pub struct Symbols {
    symbolizer: Symbolizer,
}

impl Default for Symbols {
    fn default() -> Self {
        Self::new()
    }
}

fn code(info: Option<&CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match info {
        Some(ci) => (
            Some(crate::name::from_bytes(
                std::os::unix::ffi::OsStrExt::as_bytes(ci.to_path().as_os_str()),
            )),
            ci.line,
        ),
        None => (None, None),
    }
}

impl Symbols {
    pub fn new() -> Self {
        Self {
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .build(),
        }
    }

    /// The frames of `stack`, innermost first, inlined functions as frames of their own.
    pub fn symbolize(&self, stack: &Unwound) -> Vec<Frame> {
        // One call per file, with every offset of that file.
        let mut by_file: BTreeMap<u64, (Arc<ModuleFile>, Vec<usize>)> = BTreeMap::new();
        for (i, f) in stack.frames.iter().enumerate() {
            if let Some(file) = f.mapping.as_ref().and_then(|m| m.file.clone()) {
                by_file
                    .entry(file.id)
                    .or_insert_with(|| (file, Vec::new()))
                    .1
                    .push(i);
            }
        }
        let mut named: Vec<Vec<Frame>> = vec![Vec::new(); stack.frames.len()];
        for (file, indexes) in by_file.values() {
            let offsets: Vec<u64> = indexes
                .iter()
                .filter_map(|&i| {
                    let f = &stack.frames[i];
                    f.mapping.as_ref().map(|m| m.file_offset(f.lookup))
                })
                .collect();
            let src = Source::Elf(Elf::new(file.fd_path.clone()));
            let Ok(syms) = self.symbolizer.symbolize(&src, Input::FileOffset(&offsets)) else {
                continue;
            };
            for (&i, sym) in indexes.iter().zip(syms) {
                let Symbolized::Sym(sym) = sym else {
                    continue;
                };
                let base = base_frame(stack, i);
                let mut out = Vec::new();
                // Innermost first: the last inlined call is where the address is.
                for inl in sym.inlined.iter().rev() {
                    let (file, line) = code(inl.code_info.as_ref());
                    out.push(Frame {
                        function: Some(inl.name.to_string()),
                        file,
                        line,
                        inlined: true,
                        ..base.clone()
                    });
                }
                let (file, line) = code(sym.code_info.as_deref());
                out.push(Frame {
                    function: Some(sym.name.to_string()),
                    file,
                    line,
                    ..base
                });
                named[i] = out;
            }
        }
        named
            .into_iter()
            .enumerate()
            .flat_map(|(i, frames)| {
                if frames.is_empty() {
                    vec![base_frame(stack, i)]
                } else {
                    frames
                }
            })
            .collect()
    }
}

/// The frame of `stack.frames[i]` without a name: its address, module and offset.
fn base_frame(stack: &Unwound, i: usize) -> Frame {
    let f = &stack.frames[i];
    Frame {
        addr: f.addr,
        module: f.mapping.as_ref().map(|m| m.module()),
        offset: f.mapping.as_ref().map_or(0, |m| m.file_offset(f.addr)),
        ..Frame::default()
    }
}
