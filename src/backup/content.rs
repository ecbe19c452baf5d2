//! wp-content's side of a backup and a restore. The control plane cannot reach the tenant's
//! EFS directory, so a one-off ECS task (the "archiver", `platform.archiver_image`) mounts
//! it through the tenant's access point and runs [`SCRIPT`] in one of these modes:
//!
//! - `backup`: `tar | gzip` streamed through `sha256sum` and `wc -c` into `aws s3 cp -`
//!   (the CLI's streaming multipart upload; nothing is written to the task's disk), then
//!   `{key}.json` with the archive's sha256 and size beside it. Entries named `.im-*` (our
//!   own staging directories) are left out.
//! - `stage`: streams the archive back (`aws s3 cp … -`) through `sha256sum` into
//!   `tar xz` in `.im-restore-{op}` inside wp-content, and fails (exit 3, staging removed)
//!   unless the sha256 is the manifest's. The live content is not touched.
//! - `swap`: moves the live entries into `.im-previous-{op}`, then the staged entries in.
//!   Resumable: a marker records that the first half finished, so a rerun after a crash
//!   never moves restored entries aside.
//! - `unswap` (a rollback): removes whatever was moved in and moves the previous entries
//!   back; removes the staging directory.
//! - `cleanup` (the restore completed): removes `.im-previous-{op}` and any staging.
//!
//! The image needs `sh`, `tar`, `gzip`, coreutils (`sha256sum`, `mkfifo`, `tee`, `wc`) and
//! the AWS CLI v2; on an Alpine image without them (the default, `alpine:3`) the script
//! first tries `apk add`, then checks and exits 127 naming what is missing.

/// The archiver's script (POSIX sh; `set -o pipefail` is not POSIX, so every stage of a
/// pipeline that matters reports its failure through a file).
pub const SCRIPT: &str = r#"set -eu
# The default image (alpine) has no AWS CLI: fetch it where the task can reach Alpine's
# repositories (it could pull the image, so it usually can); otherwise the check below
# names what is missing.
if ! command -v aws >/dev/null 2>&1 && command -v apk >/dev/null 2>&1; then
  apk add --no-cache aws-cli tar gzip coreutils >/dev/null 2>&1 || true
fi
for tool in tar gzip sha256sum mkfifo tee wc aws; do
  command -v "$tool" >/dev/null 2>&1 || { echo "archiver image lacks $tool" >&2; exit 127; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$CONTENT_DIR"
stage=".im-restore-$OPERATION"
previous=".im-previous-$OPERATION"
marker="$previous/.im-moved-aside"
# Every entry of a directory but . and .. (and, at the top, not ours).
entries() {
  for entry in "$1"/* "$1"/.[!.]* "$1"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case "${entry##*/}" in .im-*) [ "$1" = . ] && continue ;; esac
    printf '%s\n' "$entry"
  done
}
case "$MODE" in
backup)
  mkfifo "$work/hash" "$work/size"
  sha256sum < "$work/hash" > "$work/sha256" &
  wc -c < "$work/size" > "$work/bytes" &
  { tar cf - --exclude='./.im-*' . || echo tar > "$work/failed"; } | { gzip -c || echo gzip > "$work/failed"; } \
    | tee "$work/hash" "$work/size" | aws s3 cp --only-show-errors - "s3://$ARCHIVE_BUCKET/$ARCHIVE_KEY"
  wait
  [ ! -e "$work/failed" ] || { echo "$(cat "$work/failed") failed" >&2; exit 1; }
  printf '{"sha256":"%s","bytes":%s}' "$(cut -d' ' -f1 "$work/sha256")" "$(tr -d ' ' < "$work/bytes")" \
    | aws s3 cp --only-show-errors - "s3://$ARCHIVE_BUCKET/$ARCHIVE_KEY.json"
  ;;
stage)
  rm -rf "$stage"
  mkdir "$stage"
  mkfifo "$work/hash"
  sha256sum < "$work/hash" > "$work/sha256" &
  { aws s3 cp --only-show-errors "s3://$ARCHIVE_BUCKET/$ARCHIVE_KEY" - || echo download > "$work/failed"; } \
    | tee "$work/hash" | tar xzf - -C "$stage" || echo extract > "$work/failed"
  wait
  actual=$(cut -d' ' -f1 "$work/sha256")
  if [ -e "$work/failed" ] || [ "$actual" != "$EXPECTED_SHA256" ]; then
    rm -rf "$stage"
    echo "the content archive failed its check (sha256 $actual, expected $EXPECTED_SHA256)" >&2
    exit 3
  fi
  ;;
swap)
  if [ ! -e "$marker" ]; then
    [ -d "$stage" ] || { echo "nothing staged in $stage" >&2; exit 4; }
    mkdir -p "$previous"
    entries . | while IFS= read -r entry; do mv "$entry" "$previous/"; done
    : > "$marker"
  fi
  if [ -d "$stage" ]; then
    entries "$stage" | while IFS= read -r entry; do mv "$entry" ./; done
    rmdir "$stage"
  fi
  ;;
unswap)
  if [ -e "$marker" ]; then
    entries . | while IFS= read -r entry; do rm -rf "$entry"; done
    rm -f "$marker"
    entries "$previous" | while IFS= read -r entry; do mv "$entry" ./; done
    rmdir "$previous"
  fi
  rm -rf "$stage"
  ;;
cleanup)
  rm -rf "$previous" "$stage"
  ;;
*)
  echo "unknown mode $MODE" >&2
  exit 2
  ;;
esac
"#;

/// What `backup` mode writes beside the archive (`{key}.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContentSummary {
    pub sha256: String,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    //! The script run here with `sh` on a scratch directory, with an `aws` stand-in that
    //! keeps "objects" as files: what the archiver does to wp-content, checked byte for
    //! byte.

    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::*;

    struct Scratch {
        root: PathBuf,
    }

    impl Scratch {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!(
                "im-content-{name}-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(root.join("bin")).unwrap();
            std::fs::create_dir_all(root.join("bucket")).unwrap();
            std::fs::create_dir_all(root.join("content")).unwrap();
            // `aws s3 cp [--only-show-errors] SRC DST` where one side is `-`.
            let aws = format!(
                "#!/bin/sh\n[ \"$1 $2\" = 's3 cp' ] || exit 9\nshift 2\n[ \"$1\" = --only-show-errors ] && shift\n\
                 bucket={}\nkey() {{ printf '%s' \"$1\" | sed 's|^s3://[^/]*/||' | tr '/' '_'; }}\n\
                 if [ \"$1\" = - ]; then cat > \"$bucket/$(key \"$2\")\"; else cat \"$bucket/$(key \"$1\")\"; fi\n",
                root.join("bucket").display()
            );
            let path = root.join("bin/aws");
            std::fs::write(&path, aws).unwrap();
            Command::new("chmod").arg("+x").arg(&path).status().unwrap();
            Self { root }
        }

        fn content(&self) -> PathBuf {
            self.root.join("content")
        }

        fn run(&self, mode: &str, extra: &[(&str, &str)]) -> std::process::Output {
            let path = format!(
                "{}:{}",
                self.root.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(SCRIPT)
                .env("PATH", path)
                .env("MODE", mode)
                .env("CONTENT_DIR", self.content())
                .env("OPERATION", "op1")
                .env("ARCHIVE_BUCKET", "b")
                .env("ARCHIVE_KEY", "backups/x/wp-content.tar.gz");
            for (k, v) in extra {
                command.env(k, v);
            }
            command.output().unwrap()
        }

        fn object(&self, key: &str) -> PathBuf {
            self.root.join("bucket").join(key.replace('/', "_"))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// Every file under `dir` (relative path → bytes), `.im-*` at the top left out.
    fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(base).unwrap().display().to_string();
                if rel.starts_with(".im-") {
                    continue;
                }
                if path.is_dir() {
                    out.insert(format!("{rel}/"), Vec::new());
                    walk(base, &path, out);
                } else {
                    out.insert(rel, std::fs::read(&path).unwrap());
                }
            }
        }
        walk(dir, dir, &mut out);
        out
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    fn ok(output: &std::process::Output) {
        assert!(
            output.status.success(),
            "exit {:?}: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn backup_stage_swap_cleanup_restore_content_exactly() {
        let s = Scratch::new("roundtrip");
        let c = s.content();
        std::fs::create_dir_all(c.join("uploads/2026/12")).unwrap();
        std::fs::write(c.join("uploads/2026/12/photo.bin"), vec![7u8; 300_000]).unwrap();
        std::fs::write(c.join(".htaccess"), "deny from all\n").unwrap();
        std::fs::write(c.join("name with spaces.txt"), "émoji 🎉 עברית\n").unwrap();
        std::fs::create_dir_all(c.join("plugins/empty")).unwrap();
        let original = tree(&c);

        ok(&s.run("backup", &[]));
        let archive = std::fs::read(s.object("backups/x/wp-content.tar.gz")).unwrap();
        let summary: ContentSummary = serde_json::from_slice(
            &std::fs::read(s.object("backups/x/wp-content.tar.gz.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(summary.sha256, sha256_hex(&archive));
        assert_eq!(summary.bytes, archive.len() as u64);

        // Damage the live content, then restore it.
        std::fs::remove_file(c.join(".htaccess")).unwrap();
        std::fs::write(c.join("uploads/2026/12/photo.bin"), b"overwritten").unwrap();
        std::fs::write(c.join("added-later.php"), "<?php").unwrap();
        let damaged = tree(&c);

        ok(&s.run("stage", &[("EXPECTED_SHA256", &summary.sha256)]));
        assert_eq!(tree(&c), damaged, "staging must not touch the live content");
        ok(&s.run("swap", &[]));
        assert_eq!(tree(&c), original);
        // A swap repeated after a crash changes nothing.
        ok(&s.run("swap", &[]));
        assert_eq!(tree(&c), original);
        ok(&s.run("cleanup", &[]));
        assert_eq!(tree(&c), original);
        let left: Vec<_> = std::fs::read_dir(&c)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".im-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn unswap_puts_the_previous_content_back() {
        let s = Scratch::new("unswap");
        let c = s.content();
        std::fs::write(c.join("a.txt"), "old a").unwrap();
        ok(&s.run("backup", &[]));
        let summary: ContentSummary = serde_json::from_slice(
            &std::fs::read(s.object("backups/x/wp-content.tar.gz.json")).unwrap(),
        )
        .unwrap();
        std::fs::write(c.join("a.txt"), "new a").unwrap();
        std::fs::write(c.join("b.txt"), "new b").unwrap();
        let live = tree(&c);
        ok(&s.run("stage", &[("EXPECTED_SHA256", &summary.sha256)]));
        ok(&s.run("swap", &[]));
        assert_eq!(std::fs::read(c.join("a.txt")).unwrap(), b"old a");
        ok(&s.run("unswap", &[]));
        assert_eq!(tree(&c), live);
        // Nothing of ours is left, and a repeat is harmless.
        ok(&s.run("unswap", &[]));
        assert_eq!(tree(&c), live);
        assert_eq!(std::fs::read_dir(&c).unwrap().count(), 2);
    }

    #[test]
    fn a_damaged_archive_is_refused_before_the_live_content_is_touched() {
        let s = Scratch::new("damaged");
        let c = s.content();
        std::fs::write(c.join("a.txt"), "live").unwrap();
        ok(&s.run("backup", &[]));
        let key = s.object("backups/x/wp-content.tar.gz");
        let mut bytes = std::fs::read(&key).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&key, bytes).unwrap();
        let summary: ContentSummary = serde_json::from_slice(
            &std::fs::read(s.object("backups/x/wp-content.tar.gz.json")).unwrap(),
        )
        .unwrap();
        let output = s.run("stage", &[("EXPECTED_SHA256", &summary.sha256)]);
        assert_eq!(output.status.code(), Some(3), "{output:?}");
        assert_eq!(std::fs::read(c.join("a.txt")).unwrap(), b"live");
        assert_eq!(std::fs::read_dir(&c).unwrap().count(), 1, "staging removed");
        // And a swap with nothing staged refuses.
        assert_eq!(s.run("swap", &[]).status.code(), Some(4));
        assert_eq!(std::fs::read(c.join("a.txt")).unwrap(), b"live");
    }
}
