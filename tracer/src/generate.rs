//! `vmatrace generate man DIR | completions SHELL`: the man pages and shell completions, made
//! from the same clap [`Cli`] that parses the command line, so a packaged page never disagrees
//! with `--help`. `cargo xtask dist` runs it on the host build and puts the files in the
//! packages. It is parsed apart from [`Cli`] (by `main` when the first argument is
//! `generate`), so that the pages and completions do not offer it.

use std::{
    ffi::OsString,
    io::Write,
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::cli::Cli;

/// Man pages and shell completions for packagers.
#[derive(Debug, Parser)]
#[command(name = "vmatrace generate")]
pub struct GenerateCli {
    #[command(subcommand)]
    pub what: Generate,
}

/// What `vmatrace generate` writes.
#[derive(Debug, Subcommand)]
pub enum Generate {
    /// The man pages (vmatrace.1 and one per subcommand) into DIR.
    Man {
        /// The directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// The completion script of SHELL, on stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `vmatrace generate ARGS` (`args` starts with `generate`); clap's own exit on bad usage.
pub fn main(args: impl Iterator<Item = OsString>) -> Result<(), GenerateError> {
    let cli = GenerateCli::parse_from(args);
    generate(&cli.what, &mut std::io::stdout().lock())
}

/// Why a man page or completion script could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {what}")]
    Write {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes what `what` asks for: man pages into their directory, a completion script to `out`.
pub fn generate(what: &Generate, out: &mut dyn Write) -> Result<(), GenerateError> {
    match what {
        Generate::Man { dir } => man_pages(dir),
        Generate::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "vmatrace", out);
            out.flush().map_err(|source| GenerateError::Write {
                what: format!("the {shell} completions"),
                source,
            })
        }
    }
}

/// `vmatrace.1` and `vmatrace-SUB.1` for each visible subcommand.
fn man_pages(dir: &Path) -> Result<(), GenerateError> {
    std::fs::create_dir_all(dir).map_err(|source| GenerateError::Create {
        path: dir.display().to_string(),
        source,
    })?;
    let cmd = Cli::command();
    let mut pages = vec![("vmatrace".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("vmatrace-{}", sub.get_name());
        let page = sub
            .clone()
            .display_name(&name)
            .bin_name(format!("vmatrace {}", sub.get_name()));
        pages.push((name, page));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page)
            .title(name.clone())
            .render(&mut buf)
            .and_then(|()| std::fs::write(&path, &buf))
            .map_err(|source| GenerateError::Write {
                what: path.display().to_string(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_name_every_visible_subcommand_and_hide_generate() {
        let dir = std::env::temp_dir().join(format!("vmatrace-man-{}", std::process::id()));
        man_pages(&dir).expect("test setup");
        let main = std::fs::read_to_string(dir.join("vmatrace.1")).expect("test setup");
        assert!(main.contains("vmatrace\\-record(1)") || main.contains("record"));
        assert!(!main.contains("generate"), "the hidden subcommand leaked");
        let record = std::fs::read_to_string(dir.join("vmatrace-record.1")).expect("test setup");
        assert!(record.contains("max\\-size"), "{record}");
        assert!(!dir.join("vmatrace-generate.1").exists());
        std::fs::remove_dir_all(&dir).expect("test setup");
    }

    #[test]
    fn completions_offer_the_options_for_each_shell() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            generate(&Generate::Completions { shell }, &mut out).expect("test setup");
            let text = String::from_utf8(out).expect("test setup");
            assert!(text.contains("snapshot-every"), "{shell}: {text}");
            assert!(
                !text.contains("generate"),
                "{shell}: the hidden subcommand leaked"
            );
        }
    }
}
