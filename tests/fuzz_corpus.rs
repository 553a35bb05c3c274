//! Replays every committed fuzz input (`fuzz/corpus/<target>/*` and
//! `fuzz/regressions/<target>/*`) through the same property checks the cargo-fuzz targets
//! run (`fuzz/props/mod.rs`), so each one is a regression test on stable, without nightly
//! or libFuzzer.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

#[path = "../fuzz/props/mod.rs"]
mod props;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(kind: &str, require_seeds: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let mut failures = Vec::new();
    for (target, check) in props::TARGETS {
        let files = inputs(&root.join(target));
        assert!(
            !require_seeds || !files.is_empty(),
            "no seeds in fuzz/{kind}/{target}"
        );
        for file in files {
            let data = fs::read(&file).expect("read corpus file");
            if panic::catch_unwind(|| check(&data)).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "failing inputs: {failures:#?}");
}

#[test]
fn corpus_replays_clean() {
    replay("corpus", true);
}

#[test]
fn regressions_replay_clean() {
    replay("regressions", false);
}

/// Every target directory is a target the replay knows (a renamed target would otherwise
/// silently stop being replayed).
#[test]
fn corpus_dirs_match_targets() {
    for kind in ["corpus", "regressions"] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind);
        let Ok(entries) = fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                props::TARGETS.iter().any(|(t, _)| *t == name),
                "fuzz/{kind}/{name} is not a target"
            );
        }
    }
}
