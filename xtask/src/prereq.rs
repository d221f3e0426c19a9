//! Prerequisites: the bare-metal rustup target and the QEMU tools; for
//! fuzzing, the nightly toolchain and cargo-fuzz.
//!
//! Each check prints what it found or did. A missing tool is an error, never a
//! skip. When running as root, missing QEMU tools are installed with apt-get.
//!
//! Debian splits QEMU into `qemu-utils` (qemu-img, qemu-io) and
//! `qemu-system-x86`, and the two must come from the same QEMU version: a
//! `qemu-utils` newer than 8.0 `Breaks` the `qemu-system-common` of 7.2. So the
//! installer first finds out which version of `qemu-utils` (or
//! `qemu-system-x86`) is already installed and installs the other package at
//! exactly that version, from whichever release offers it (`apt-get -t`).
//! Machines of this project's kind carry a `qemu-utils` from
//! bookworm-backports while only bookworm itself is configured; then the
//! backports release is consulted through a private source list under
//! `target/xtask/apt/`, removed again afterwards (the system's apt
//! configuration is not edited). That list names no mirror of its own: it
//! reuses the URI (and keyring) that the system's apt sources already use for
//! the base release.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cmd::Cmd;
use crate::{Context, Error, Result, Workspace};

/// The target of the no_std build (and, later, of the kernel).
pub const BARE_METAL_TARGET: &str = "x86_64-unknown-none";

/// The QEMU programs the tests and the demo use (qemu-storage-daemon: the
/// reference the QMP tests compare with; it comes with qemu-utils).
pub const QEMU_TOOLS: [&str; 4] = [
    "qemu-img",
    "qemu-io",
    "qemu-storage-daemon",
    "qemu-system-x86_64",
];

/// Debian packages that provide [`QEMU_TOOLS`]; always installed together.
const QEMU_PACKAGES: [&str; 2] = ["qemu-system-x86", "qemu-utils"];

/// Everything `cargo xtask test` and `cargo xtask demo` need.
pub fn ensure_all(ws: &Workspace) -> Result<()> {
    println!("==> prerequisites");
    ensure_rust_target(ws, BARE_METAL_TARGET)?;
    ensure_qemu(ws)?;
    Ok(())
}

/// Makes sure the standard library for `target` is installed.
pub fn ensure_rust_target(ws: &Workspace, target: &str) -> Result<()> {
    if find_on_path("rustup").is_none() {
        // Not a rustup toolchain: the target must already be in the sysroot.
        let sysroot = Cmd::new("rustc")
            .args(["--print", "sysroot"])
            .cwd(&ws.root)
            .quiet()
            .read()?;
        let lib = Path::new(sysroot.trim()).join("lib/rustlib").join(target);
        if lib.is_dir() {
            println!("    rust target {target}: present in {}", sysroot.trim());
            return Ok(());
        }
        return Err(Error::msg(format!(
            "rust target {target} is missing and rustup is not on PATH to add it"
        )));
    }
    // Run from the workspace so a rust-toolchain file there picks the toolchain.
    let installed = Cmd::new("rustup")
        .args(["target", "list", "--installed"])
        .cwd(&ws.root)
        .quiet()
        .read()?;
    if installed.lines().any(|line| line.trim() == target) {
        println!("    rust target {target}: installed");
        return Ok(());
    }
    println!("    rust target {target}: missing, adding it");
    Cmd::new("rustup")
        .args(["target", "add", target])
        .cwd(&ws.root)
        .run()
}

/// Makes sure qemu-img, qemu-io, qemu-storage-daemon and
/// qemu-system-x86_64 are on PATH.
pub fn ensure_qemu(ws: &Workspace) -> Result<()> {
    let missing = missing_tools();
    if missing.is_empty() {
        println!("    {}", describe_qemu_tools()?);
        return Ok(());
    }
    let missing = missing.join(", ");
    println!("    missing on PATH: {missing}");
    if !running_as_root()? {
        return Err(Error::msg(format!(
            "{missing} not found on PATH. Install them (Debian/Ubuntu: \
             `sudo apt-get install qemu-system-x86 qemu-utils`, both in one \
             command and at the same version) or rerun as root to let xtask do it"
        )));
    }
    install_qemu_with_apt(ws)?;
    let still_missing = missing_tools();
    if !still_missing.is_empty() {
        return Err(Error::msg(format!(
            "apt-get finished but {} is still not on PATH",
            still_missing.join(", ")
        )));
    }
    println!("    installed: {}", describe_qemu_tools()?);
    Ok(())
}

fn missing_tools() -> Vec<&'static str> {
    QEMU_TOOLS
        .into_iter()
        .filter(|tool| find_on_path(tool).is_none())
        .collect()
}

/// `qemu-img 10.0.2, qemu-io 10.0.2, ...`, noting a version mismatch.
fn describe_qemu_tools() -> Result<String> {
    let mut parts = Vec::new();
    let mut versions = Vec::new();
    for tool in QEMU_TOOLS {
        let out = Cmd::new(tool).arg("--version").quiet().read()?;
        let version = version_from_banner(&out).unwrap_or("(unknown version)");
        parts.push(format!("{tool} {version}"));
        versions.push(version.to_owned());
    }
    let mut text = parts.join(", ");
    versions.dedup();
    if versions.len() > 1 {
        text.push_str(" (WARNING: versions differ)");
    }
    Ok(text)
}

/// The word after `version` on the first line of a `--version` banner.
fn version_from_banner(banner: &str) -> Option<&str> {
    let mut words = banner.lines().next()?.split_whitespace();
    words.find(|w| *w == "version")?;
    words.next()
}

pub fn running_as_root() -> Result<bool> {
    let uid = Cmd::new("id").arg("-u").quiet().read()?;
    Ok(uid.trim() == "0")
}

/// The first executable called `name` in a directory of `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| {
            fs::metadata(file).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Extra `-o` options pointing apt at a private source list and lists directory.
#[derive(Clone, Debug, Default)]
struct AptConfig {
    options: Vec<String>,
}

impl AptConfig {
    fn apt_get(&self) -> Cmd {
        Cmd::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C")
            .args(&self.options)
    }

    fn apt_cache(&self) -> Cmd {
        Cmd::new("apt-cache").env("LC_ALL", "C").args(&self.options)
    }
}

fn install_qemu_with_apt(ws: &Workspace) -> Result<()> {
    for tool in ["apt-get", "apt-cache", "dpkg-query"] {
        if find_on_path(tool).is_none() {
            return Err(Error::msg(format!(
                "QEMU tools are missing and `{tool}` is not available to install \
                 them; install qemu-img, qemu-io and qemu-system-x86_64 by hand"
            )));
        }
    }
    let system = AptConfig::default();
    system.apt_get().arg("update").run()?;

    // Which version do we have to match?
    let mut anchor = None;
    for package in ["qemu-utils", "qemu-system-x86"] {
        if let Some(version) = installed_version(package)? {
            println!("    {package} {version} is installed; matching that version");
            anchor = Some((package, version));
            break;
        }
    }
    let Some((have, version)) = anchor else {
        // Nothing installed: the configured candidates belong together.
        return install(&system, None);
    };
    let want = if have == "qemu-utils" {
        "qemu-system-x86"
    } else {
        "qemu-utils"
    };
    if installed_version(want)?.is_some() {
        return Err(Error::msg(format!(
            "{} are installed but a QEMU tool is missing from PATH; check PATH",
            QEMU_PACKAGES.join(" and ")
        )));
    }

    let policy = Policy::parse(&system.apt_cache().args(["policy", want]).quiet().read()?);
    if let Some(release) = policy.release_offering(&version) {
        let release = (policy.candidate.as_deref() != Some(version.as_str())).then_some(release);
        return install(&system, release);
    }

    // A backport we cannot see: ask the matching backports release directly.
    if version.contains("~bpo") {
        if let Some(codename) = os_codename() {
            let suite = format!("{codename}-backports");
            println!(
                "    no configured apt source has {want} {version}; \
                 consulting {suite} through a private source list"
            );
            let base = base_release_source(&codename)?;
            println!("    using the mirror of {codename}: {}", base.uri);
            let dir = ws.target_dir.join("xtask/apt");
            let outcome = install_through_private_list(&dir, &base, &suite, want, &version);
            // About 100 MB of package lists and caches, needed only just now.
            let _ = fs::remove_dir_all(&dir);
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent); // only if empty
            }
            if outcome? {
                return Ok(());
            }
        }
    }

    let fallback = policy.candidate.as_deref().unwrap_or("<candidate>");
    Err(Error::msg(format!(
        "{have} {version} is installed but no apt source offers {want} {version}, \
         and Debian's qemu-utils and qemu-system-x86 must be the same version. \
         Either add the release that provides {version} to apt's sources, or accept \
         the distribution's version for both: \
         `apt-get install --allow-downgrades {want} {have}={fallback}`"
    )))
}

/// Installs both packages at `version` from `suite` (served by `base`'s URI),
/// seen through a private source list in `dir`. `Ok(false)` if `suite` does
/// not offer that version.
fn install_through_private_list(
    dir: &Path,
    base: &AptSource,
    suite: &str,
    want: &str,
    version: &str,
) -> Result<bool> {
    let private = private_backports_config(dir, base, suite)?;
    private.apt_get().arg("update").run()?;
    let policy = Policy::parse(&private.apt_cache().args(["policy", want]).quiet().read()?);
    match policy.release_offering(version) {
        Some(release) => install(&private, Some(release)).map(|()| true),
        None => Ok(false),
    }
}

fn install(apt: &AptConfig, release: Option<&str>) -> Result<()> {
    let mut cmd = apt
        .apt_get()
        .args(["install", "-y", "--no-install-recommends"]);
    if let Some(release) = release {
        cmd = cmd.args(["-t", release]);
    }
    // Both packages in ONE command: alone, a qemu-system-x86 from another
    // release would make apt remove the installed qemu-utils.
    cmd.args(QEMU_PACKAGES).run()
}

/// The installed version of a Debian package, if it is installed.
fn installed_version(package: &str) -> Result<Option<String>> {
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}|${Version}", package])
        .quiet()
        .output()?;
    // dpkg-query exits 1 for a package it has never heard of.
    if !out.status.success() {
        return Ok(None);
    }
    let text = out.stdout_text();
    let (status, version) = text.split_once('|').unwrap_or(("", ""));
    Ok((status.starts_with("ii") && !version.is_empty()).then(|| version.to_owned()))
}

/// `VERSION_CODENAME` from `/etc/os-release` (`bookworm`), Debian only.
fn os_codename() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
    };
    if field("ID")? != "debian" {
        return None;
    }
    field("VERSION_CODENAME").filter(|c| !c.is_empty())
}

/// The system's one-line source list; apt reads it before `SOURCE_PARTS`.
const SOURCE_LIST: &str = "/etc/apt/sources.list";

/// The system's directory of `*.list` (one-line) and `*.sources` (deb822) files.
const SOURCE_PARTS: &str = "/etc/apt/sources.list.d";

/// One URI of a `deb` entry in apt's sources, with what it serves there.
#[derive(Clone, Debug, Default, PartialEq)]
struct AptSource {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
    /// `Signed-By:` / `signed-by=`: keyring files or fingerprints, or (deb822
    /// only) an embedded key block, which spans several lines.
    signed_by: Option<String>,
}

impl AptSource {
    fn serves(&self, suite: &str, component: &str) -> bool {
        self.suites.iter().any(|s| s == suite) && self.components.iter().any(|c| c == component)
    }

    /// The one-line `deb` entry for `suite` at this URI with this keyring;
    /// `key_file` holds an embedded key block, which one-line entries cannot.
    fn deb_line(&self, suite: &str, key_file: &Path) -> String {
        let options = match &self.signed_by {
            Some(key) if key.contains('\n') => {
                format!("[signed-by={}] ", key_file.display())
            }
            Some(keys) => {
                let keys: Vec<&str> = keys
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|k| !k.is_empty())
                    .collect();
                format!("[signed-by={}] ", keys.join(","))
            }
            None => String::new(),
        };
        format!("deb {options}{} {suite} main\n", self.uri)
    }

    /// An embedded key block as the ASCII-armored text apt reads from a file.
    fn embedded_key(&self) -> Option<String> {
        let key = self.signed_by.as_deref().filter(|k| k.contains('\n'))?;
        let mut text: String = key
            .lines()
            .map(|line| if line == "." { "" } else { line })
            .skip_while(|line| line.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        text.push('\n');
        Some(text)
    }
}

/// The `deb` entries of a deb822 `.sources` file, one per URI.
fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    let mut stanza: Vec<(String, String)> = Vec::new();
    // A blank line ends a stanza; a final stanza is flushed by the extra "".
    for line in text.lines().chain([""]) {
        if line.trim().is_empty() {
            sources.extend(deb822_stanza(&stanza));
            stanza.clear();
        } else if line.starts_with('#') {
            // comment
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = stanza.last_mut() {
                value.push('\n');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            stanza.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    sources
}

fn deb822_stanza(fields: &[(String, String)]) -> Vec<AptSource> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let words = |name: &str| -> Vec<String> {
        field(name)
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let enabled = field("enabled").is_none_or(|v| !v.eq_ignore_ascii_case("no"));
    if !enabled || !words("types").iter().any(|t| t == "deb") {
        return Vec::new();
    }
    let signed_by = field("signed-by")
        .map(str::to_owned)
        .filter(|v| !v.trim().is_empty());
    words("uris")
        .into_iter()
        .map(|uri| AptSource {
            uri,
            suites: words("suites"),
            components: words("components"),
            signed_by: signed_by.clone(),
        })
        .collect()
}

/// The `deb` entries of a one-line `.list` file:
/// `deb [option=value ...] URI SUITE COMPONENT...`.
fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb") else {
            continue;
        };
        if !rest.starts_with(char::is_whitespace) {
            continue; // deb-src
        }
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(options) = rest.strip_prefix('[') {
            let Some((options, after)) = options.split_once(']') else {
                continue;
            };
            for option in options.split_whitespace() {
                if let Some(value) = option.strip_prefix("signed-by=") {
                    signed_by = Some(value.to_owned());
                }
            }
            rest = after;
        }
        let mut words = rest.split_whitespace().map(str::to_owned);
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        sources.push(AptSource {
            uri,
            suites: vec![suite],
            components: words.collect(),
            signed_by,
        });
    }
    sources
}

/// All `deb` entries of the system's apt sources, in the order apt reads them.
fn system_sources() -> Vec<AptSource> {
    let mut sources = parse_one_line(&fs::read_to_string(SOURCE_LIST).unwrap_or_default());
    let mut parts: Vec<PathBuf> = fs::read_dir(SOURCE_PARTS)
        .map(|dir| dir.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default();
    parts.sort();
    for part in parts {
        let parse = match part.extension().and_then(|e| e.to_str()) {
            Some("sources") => parse_deb822,
            Some("list") => parse_one_line,
            _ => continue, // e.g. `*.disabled-by-farm`, `*.save`
        };
        if let Ok(text) = fs::read_to_string(&part) {
            sources.extend(parse(&text));
        }
    }
    sources
}

/// The source that serves the `main` component of release `codename`; its
/// URI also serves `<codename>-backports`.
fn base_release_source(codename: &str) -> Result<AptSource> {
    system_sources()
        .into_iter()
        .find(|source| source.serves(codename, "main"))
        .ok_or_else(|| {
            Error::msg(format!(
                "cannot consult {codename}-backports: none of apt's sources \
                 ({SOURCE_LIST}, {SOURCE_PARTS}/*.list, {SOURCE_PARTS}/*.sources) \
                 has a `deb` entry for suite {codename} with component main, \
                 whose URI could serve it. Add {codename}-backports to apt's \
                 sources by hand"
            ))
        })
}

/// An apt configuration that sees the system's sources plus `suite`, served
/// from `base`'s URI and checked with `base`'s keyring.
///
/// `Dir::Etc::sourcelist` (normally `/etc/apt/sources.list`) is replaced by a
/// file holding that file's lines plus the backports line;
/// `/etc/apt/sources.list.d` is still read. Package lists and apt's caches go
/// to `dir`, so the system's are untouched.
fn private_backports_config(dir: &Path, base: &AptSource, suite: &str) -> Result<AptConfig> {
    let lists = dir.join("lists");
    fs::create_dir_all(lists.join("partial")).context(format!("creating {}", lists.display()))?;
    let key_file = dir.join("keyring.asc");
    if let Some(key) = base.embedded_key() {
        fs::write(&key_file, key).context(format!("writing {}", key_file.display()))?;
    }
    let mut sources = fs::read_to_string(SOURCE_LIST).unwrap_or_default();
    if !sources.is_empty() && !sources.ends_with('\n') {
        sources.push('\n');
    }
    sources.push_str(&base.deb_line(suite, &key_file));
    let list_file = dir.join("sources.list");
    fs::write(&list_file, sources).context(format!("writing {}", list_file.display()))?;
    let settings = [
        format!("Dir::Etc::sourcelist={}", list_file.display()),
        format!("Dir::State::lists={}", lists.display()),
        format!(
            "Dir::Cache::pkgcache={}",
            dir.join("pkgcache.bin").display()
        ),
        format!(
            "Dir::Cache::srcpkgcache={}",
            dir.join("srcpkgcache.bin").display()
        ),
    ];
    Ok(AptConfig {
        options: settings
            .into_iter()
            .flat_map(|setting| ["-o".to_owned(), setting])
            .collect(),
    })
}

/// The parts of `apt-cache policy PACKAGE` we need.
#[derive(Debug, Default, PartialEq)]
struct Policy {
    candidate: Option<String>,
    /// Each available version with the suites (`bookworm-backports`) offering it.
    versions: Vec<(String, Vec<String>)>,
}

impl Policy {
    /// Parses output like:
    ///
    /// ```text
    /// qemu-system-x86:
    ///   Installed: (none)
    ///   Candidate: 1:7.2+dfsg-7+deb12u18+b3
    ///   Version table:
    ///      1:10.0.2+ds-2+deb13u1~bpo12+1 100
    ///         100 http://MIRROR/debian bookworm-backports/main amd64 Packages
    ///  *** 1:7.2+dfsg-7+deb12u18+b3 500
    ///         500 http://MIRROR/debian bookworm/main amd64 Packages
    ///         100 /var/lib/dpkg/status
    /// ```
    fn parse(text: &str) -> Self {
        let mut policy = Policy::default();
        let mut in_table = false;
        let mut version_indent = None;
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(candidate) = trimmed.strip_prefix("Candidate:") {
                let candidate = candidate.trim();
                if candidate != "(none)" {
                    policy.candidate = Some(candidate.to_owned());
                }
            } else if trimmed == "Version table:" {
                in_table = true;
            } else if in_table && !trimmed.is_empty() {
                // Version lines sit left of their source lines; "***" marks
                // the installed version and counts as indentation.
                let body = line.replacen(" *** ", "     ", 1);
                let indent = body.len() - body.trim_start().len();
                let is_version = *version_indent.get_or_insert(indent) >= indent;
                let mut words = body.split_whitespace();
                if is_version {
                    if let Some(version) = words.next() {
                        policy.versions.push((version.to_owned(), Vec::new()));
                    }
                } else if let (Some(_priority), Some(_uri), Some(dist)) =
                    (words.next(), words.next(), words.next())
                {
                    let suite = dist.split('/').next().unwrap_or(dist);
                    if let Some((_, suites)) = policy.versions.last_mut() {
                        if !suite.is_empty() && suite != "." {
                            suites.push(suite.to_owned());
                        }
                    }
                }
            }
        }
        policy
    }

    /// A suite that offers exactly `version`, if any.
    fn release_offering(&self, version: &str) -> Option<&str> {
        self.versions
            .iter()
            .find(|(v, _)| v == version)
            .and_then(|(_, suites)| suites.first())
            .map(String::as_str)
    }
}

/// The toolchain the fuzz targets are built with (libFuzzer's
/// AddressSanitizer needs `-Z` flags).
pub const FUZZ_TOOLCHAIN: &str = "nightly";

/// Which cargo builds the fuzz targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuzzToolchain {
    /// `cargo +nightly`.
    Nightly,
    /// The cargo running xtask: when nightly cannot be had, builds without
    /// a sanitizer still work (coverage instrumentation is stable).
    Default,
}

impl FuzzToolchain {
    /// A cargo command of this toolchain, run from the workspace root.
    pub fn cargo(self, ws: &Workspace) -> Cmd {
        match self {
            FuzzToolchain::Nightly => Cmd::new("cargo")
                .arg(format!("+{FUZZ_TOOLCHAIN}"))
                .cwd(&ws.root),
            FuzzToolchain::Default => ws.cargo(),
        }
    }

    /// How to type it: `cargo +nightly` or `cargo`.
    pub fn shown(self) -> String {
        match self {
            FuzzToolchain::Nightly => format!("cargo +{FUZZ_TOOLCHAIN}"),
            FuzzToolchain::Default => "cargo".to_owned(),
        }
    }
}

/// What fuzzing needs: the nightly toolchain and cargo-fuzz, installed
/// (rustup, `cargo install`) when missing. Without nightly (a machine that
/// cannot fetch toolchains) runs without a sanitizer use the default
/// toolchain, saying so; `asan` runs fail then.
pub fn ensure_fuzzing(ws: &Workspace, asan: bool) -> Result<FuzzToolchain> {
    println!("==> prerequisites for fuzzing");
    let toolchain = match ensure_toolchain(ws, FUZZ_TOOLCHAIN) {
        Ok(()) => FuzzToolchain::Nightly,
        Err(err) if !asan => {
            println!(
                "    {err}\n    building the fuzz targets with the default toolchain \
                 instead (without a sanitizer they need no nightly feature)"
            );
            FuzzToolchain::Default
        }
        Err(err) => return Err(err),
    };
    ensure_cargo_fuzz(ws, toolchain)?;
    Ok(toolchain)
}

/// Makes sure the rustup toolchain `channel` (`nightly`, not a dated one)
/// is installed.
fn ensure_toolchain(ws: &Workspace, channel: &str) -> Result<()> {
    if find_on_path("rustup").is_none() {
        return Err(Error::msg(format!(
            "fuzzing needs the {channel} toolchain (`cargo +{channel}`) and \
             rustup is not on PATH to provide it"
        )));
    }
    let list = Cmd::new("rustup")
        .args(["toolchain", "list"])
        .cwd(&ws.root)
        .quiet()
        .read()?;
    if !has_toolchain(&list, channel) {
        println!("    rust toolchain {channel}: missing, installing it");
        Cmd::new("rustup")
            .args(["toolchain", "install", channel, "--profile", "minimal"])
            .cwd(&ws.root)
            .run()?;
    }
    let version = Cmd::new("rustup")
        .args(["run", channel, "rustc", "--version"])
        .cwd(&ws.root)
        .quiet()
        .read()?;
    println!("    rust toolchain {channel}: {}", version.trim());
    Ok(())
}

/// Whether `rustup toolchain list` output has the channel itself
/// (`nightly-x86_64-unknown-linux-gnu`), not only dated ones
/// (`nightly-2025-01-01-...`).
fn has_toolchain(list: &str, channel: &str) -> bool {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| name.strip_prefix(channel))
        .any(|rest| {
            rest.is_empty()
                || rest
                    .strip_prefix('-')
                    .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// Makes sure `cargo +nightly fuzz` runs; installs cargo-fuzz from
/// the Rust package registry (`cargo install cargo-fuzz --locked`) when it does not.
fn ensure_cargo_fuzz(ws: &Workspace, toolchain: FuzzToolchain) -> Result<()> {
    if let Some(version) = cargo_fuzz_version(ws, toolchain) {
        println!("    {version}: installed");
        return Ok(());
    }
    println!("    cargo-fuzz: missing, installing it with `cargo install cargo-fuzz --locked`");
    ws.cargo()
        .args(["install", "cargo-fuzz", "--locked"])
        .run()?;
    match cargo_fuzz_version(ws, toolchain) {
        Some(version) => {
            println!("    installed: {version}");
            Ok(())
        }
        None => Err(Error::msg(format!(
            "`cargo install cargo-fuzz` finished but `{} fuzz --version` still \
             fails; is cargo's bin directory ($CARGO_HOME/bin) on PATH?",
            toolchain.shown()
        ))),
    }
}

/// `cargo-fuzz 0.13.1`, or `None` when `cargo fuzz` does not run.
fn cargo_fuzz_version(ws: &Workspace, toolchain: FuzzToolchain) -> Option<String> {
    let out = toolchain
        .cargo(ws)
        .args(["fuzz", "--version"])
        .quiet()
        .output()
        .ok()?;
    let text = out.stdout_text();
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITHOUT_BACKPORTS: &str = "\
qemu-system-x86:
  Installed: (none)
  Candidate: 1:7.2+dfsg-7+deb12u18+b3
  Version table:
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://MIRROR/debian bookworm/main amd64 Packages
     1:7.2+dfsg-7+deb12u15 500
        500 http://MIRROR/debian-security bookworm-security/main amd64 Packages
";

    const WITH_BACKPORTS: &str = "\
qemu-system-x86:
  Installed: (none)
  Candidate: 1:7.2+dfsg-7+deb12u18+b3
  Version table:
     1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 http://MIRROR/debian bookworm-backports/main amd64 Packages
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://MIRROR/debian bookworm/main amd64 Packages
";

    const INSTALLED: &str = "\
qemu-utils:
  Installed: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Candidate: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Version table:
 *** 1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 http://MIRROR/debian bookworm-backports/main amd64 Packages
        100 /var/lib/dpkg/status
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://MIRROR/debian bookworm/main amd64 Packages
";

    const BPO: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";

    #[test]
    fn finds_the_release_of_a_backport() {
        let policy = Policy::parse(WITH_BACKPORTS);
        assert_eq!(
            policy.candidate.as_deref(),
            Some("1:7.2+dfsg-7+deb12u18+b3")
        );
        assert_eq!(policy.release_offering(BPO), Some("bookworm-backports"));
        assert_eq!(
            policy.release_offering("1:7.2+dfsg-7+deb12u18+b3"),
            Some("bookworm")
        );
    }

    #[test]
    fn no_release_when_backports_is_not_configured() {
        let policy = Policy::parse(WITHOUT_BACKPORTS);
        assert_eq!(policy.release_offering(BPO), None);
        assert_eq!(policy.versions.len(), 2);
        assert_eq!(policy.versions[1].1, ["bookworm-security"]);
    }

    #[test]
    fn installed_marker_and_dpkg_status_are_handled() {
        let policy = Policy::parse(INSTALLED);
        assert_eq!(policy.versions.len(), 2);
        assert_eq!(policy.versions[0].0, BPO);
        assert_eq!(policy.versions[0].1, ["bookworm-backports"]);
        assert_eq!(policy.release_offering(BPO), Some("bookworm-backports"));
    }

    #[test]
    fn a_dpkg_status_only_version_has_no_release() {
        let text = "\
qemu-utils:
  Installed: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Candidate: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Version table:
 *** 1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 /var/lib/dpkg/status
";
        assert_eq!(Policy::parse(text).release_offering(BPO), None);
    }

    const DEB822: &str = "\
Types: deb
# a comment
URIs: http://MIRROR/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://MIRROR/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    #[test]
    fn deb822_stanzas_give_one_source_per_uri() {
        let sources = parse_deb822(DEB822);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].uri, "http://MIRROR/debian");
        assert_eq!(sources[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(sources[0].components, ["main"]);
        assert!(sources[0].serves("bookworm", "main"));
        assert!(!sources[1].serves("bookworm", "main"));
        let key_file = Path::new("/unused");
        assert_eq!(
            sources[0].deb_line("bookworm-backports", key_file),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://MIRROR/debian bookworm-backports main\n"
        );
    }

    #[test]
    fn deb822_skips_disabled_and_source_only_stanzas() {
        let text = "\
Types: deb-src
URIs: http://MIRROR/a
Suites: bookworm
Components: main

Types: deb
URIs: http://MIRROR/b http://MIRROR/c
Suites: bookworm
Components: main contrib
Enabled: no

Types: deb deb-src
URIs: http://MIRROR/d
Suites: bookworm
Components: main";
        let sources = parse_deb822(text);
        assert_eq!(sources.len(), 1);
        assert_eq!(sources[0].uri, "http://MIRROR/d");
        assert_eq!(sources[0].signed_by, None);
        assert_eq!(
            sources[0].deb_line("bookworm-backports", Path::new("/unused")),
            "deb http://MIRROR/d bookworm-backports main\n"
        );
    }

    #[test]
    fn deb822_embedded_key_goes_to_a_file() {
        let text = "\
Types: deb
URIs: http://MIRROR/debian
Suites: bookworm
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 AAAA
 -----END PGP PUBLIC KEY BLOCK-----
";
        let sources = parse_deb822(text);
        assert_eq!(sources.len(), 1);
        assert_eq!(
            sources[0].embedded_key().as_deref(),
            Some(
                "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n\
                 -----END PGP PUBLIC KEY BLOCK-----\n"
            )
        );
        assert_eq!(
            sources[0].deb_line("bookworm-backports", Path::new("/tmp/k.asc")),
            "deb [signed-by=/tmp/k.asc] http://MIRROR/debian bookworm-backports main\n"
        );
    }

    #[test]
    fn one_line_entries() {
        let text = "\
# deb http://MIRROR/old bookworm main
deb-src http://MIRROR/src bookworm main
deb [arch=amd64 signed-by=/k/one.gpg,/k/two.gpg] http://MIRROR/debian bookworm main contrib # note
deb http://MIRROR/debian-security bookworm-security main
debx http://MIRROR/bogus bookworm main
";
        let sources = parse_one_line(text);
        assert_eq!(sources.len(), 2);
        let base = &sources[0];
        assert_eq!(base.uri, "http://MIRROR/debian");
        assert_eq!(base.suites, ["bookworm"]);
        assert_eq!(base.components, ["main", "contrib"]);
        assert!(base.serves("bookworm", "main"));
        assert_eq!(
            base.deb_line("bookworm-backports", Path::new("/unused")),
            "deb [signed-by=/k/one.gpg,/k/two.gpg] http://MIRROR/debian bookworm-backports main\n"
        );
        assert_eq!(sources[1].signed_by, None);
        assert!(!sources[1].serves("bookworm", "main"));
    }

    #[test]
    fn toolchain_channels() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-2025-01-01-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(!has_toolchain(list, "nightly"));
        assert!(has_toolchain(list, "stable"));
        let list = format!("{list}nightly-x86_64-unknown-linux-gnu\n");
        assert!(has_toolchain(&list, "nightly"));
        assert!(!has_toolchain("nightly-dev\n", "night"));
    }

    #[test]
    fn version_banners() {
        let img = "qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright";
        assert_eq!(version_from_banner(img), Some("10.0.2"));
        let sys = "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u15)";
        assert_eq!(version_from_banner(sys), Some("7.2.15"));
        assert_eq!(version_from_banner("garbage"), None);
    }
}
