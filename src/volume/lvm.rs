//! The `lvm` backend: each volume is a logical volume `<vg>/<name>`.
//!
//! Everything goes through the lvm2 command-line tools with JSON reports
//! (`--reportformat json --units b --nosuffix`), so sizes are exact byte
//! counts. LVs this daemon creates carry the tag [`OWNER_TAG`] and one
//! naming the job; an LV without our tag is never removed. An LV whose
//! device is open (the `o` in the sixth `lv_attr` character: a running VM)
//! is never written.
//!
//! With a thin pool (`--thin-pool`), new volumes are thin LVs in it, so a
//! 50 GiB volume filled from a 2 GiB image takes about 2 GiB of the pool.
//! The pool is checked once at start: it must exist and be a thin pool,
//! and whether it zeroes newly provisioned chunks decides whether a fresh
//! thin LV provably reads as zeros (see [`ThinPool::zeroes`]). Existing
//! LVs are reused as they are, thin or not.

use std::path::PathBuf;

use serde::Deserialize;

use super::{size_is_reusable, Volume, VolumeBackend, VolumeError};
use crate::cmd::{self, CmdError};

/// Tag on every LV this daemon creates.
pub const OWNER_TAG: &str = "libvirt-volume-provisioner";

pub struct LvmBackend {
    vg: String,
    /// Where new volumes go when they are thin; `None` for plain LVs.
    thin: Option<ThinPool>,
}

/// The thin pool new volumes are created in, as `lvs` showed it at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPool {
    pub name: String,
    /// Whether the pool zeroes a chunk when it first provisions it (lvm2's
    /// `zero` field, `lvcreate --zero y`, the default). Without it, a write
    /// smaller than a chunk leaves the rest of the chunk holding whatever
    /// the pool's data device held there before, so a fresh thin LV does
    /// not provably read as zeros once written.
    pub zeroes: bool,
}

/// One row of `lvs` as we read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvInfo {
    pub name: String,
    pub size: u64,
    pub attr: String,
    pub tags: Vec<String>,
}

impl LvInfo {
    /// The sixth `lv_attr` character is `o` while the device is open.
    pub fn is_open(&self) -> bool {
        self.attr.as_bytes().get(5) == Some(&b'o')
    }

    pub fn is_ours(&self) -> bool {
        self.tags.iter().any(|t| t == OWNER_TAG)
    }
}

#[derive(Deserialize)]
struct Report {
    report: Vec<ReportItem>,
}

#[derive(Deserialize)]
struct ReportItem {
    #[serde(default)]
    lv: Vec<serde_json::Value>,
    #[serde(default)]
    vg: Vec<VgRow>,
}

#[derive(Deserialize)]
struct LvRow {
    lv_name: String,
    lv_size: String,
    lv_attr: String,
    #[serde(default)]
    lv_tags: String,
}

/// One row of the thin-pool report ([`pool_report_argv`]).
#[derive(Deserialize)]
struct PoolRow {
    lv_name: String,
    segtype: String,
    /// lvm2 2.03.16 prints `"zero"` when set, `""` when not, and
    /// `"unknown"` for LVs the field does not apply to (linear ones).
    zero: String,
}

#[derive(Deserialize)]
struct VgRow {
    vg_name: String,
    vg_free: String,
}

impl LvmBackend {
    /// Checks that `vg` exists (with `vgs`), and that `thin_pool`, when
    /// given, is a thin pool in it (with `lvs`), and returns a backend.
    /// Each error is one sentence naming the flag at fault.
    pub fn open(vg: &str, thin_pool: Option<&str>) -> Result<LvmBackend, String> {
        let out = cmd::run(&vgs_argv(vg)).map_err(|e| match e {
            CmdError::NotFound { .. } => {
                "--volume-group: lvm tools not found (install lvm2)".to_string()
            }
            other => format!("--volume-group {vg}: volume group not usable: {other}"),
        })?;
        let free = parse_vgs(&out.stdout, vg).map_err(|e| format!("--volume-group {vg}: {e}"))?;
        log::info!("volume group {vg} has {free} bytes free");
        let thin = match thin_pool {
            None => {
                log::info!("new volumes will be plain logical volumes in {vg}");
                None
            }
            Some(pool) => Some(open_thin_pool(vg, pool)?),
        };
        Ok(LvmBackend { vg: vg.to_string(), thin })
    }

    fn find(&self, name: &str) -> Result<Option<LvInfo>, VolumeError> {
        let shown = self.describe(name);
        let out = cmd::run(&lvs_argv(&self.vg))
            .map_err(|e| VolumeError::backend(&shown, "look up", e))?;
        let lvs = parse_lvs(&out.stdout)
            .map_err(|e| VolumeError::backend(&shown, "look up", std::io::Error::other(e)))?;
        Ok(lvs.into_iter().find(|lv| lv.name == name))
    }

    fn device(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{name}", self.vg))
    }
}

impl VolumeBackend for LvmBackend {
    fn kind(&self) -> &'static str {
        "lvm"
    }

    fn check(&self) -> Result<(), String> {
        let out = cmd::run(&vgs_argv(&self.vg))
            .map_err(|e| format!("volume group {} not usable: {e}", self.vg))?;
        parse_vgs(&out.stdout, &self.vg)?;
        if let Some(pool) = &self.thin {
            // The pool can be removed or renamed under a running daemon;
            // every new volume would then fail at lvcreate.
            let out = cmd::run(&pool_report_argv(&self.vg))
                .map_err(|e| format!("thin pool {}/{} not usable: {e}", self.vg, pool.name))?;
            parse_thin_pool(&out.stdout, &self.vg, &pool.name)?;
        }
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        match &self.thin {
            Some(pool) if !pool.zeroes => vec![non_zeroing_pool(&self.vg, &pool.name)],
            _ => Vec::new(),
        }
    }

    fn describe(&self, name: &str) -> String {
        format!("{}/{name}", self.vg)
    }

    fn prepare(
        &self,
        name: &str,
        size: u64,
        job: &str,
        before_create: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Volume, VolumeError> {
        let shown = self.describe(name);
        if let Some(lv) = self.find(name)? {
            if lv.is_open() {
                return Err(VolumeError::in_use(&shown));
            }
            if !size_is_reusable(lv.size, size) {
                return Err(VolumeError::size_mismatch(&shown, lv.size, size));
            }
            log::info!("reusing existing logical volume {shown} ({} bytes)", lv.size);
            return Ok(Volume {
                name: name.into(),
                path: self.device(name),
                size: lv.size,
                created: false,
                reads_as_zero: false,
            });
        }
        before_create().map_err(|why| VolumeError::refused(&shown, "create", why))?;
        let (argv, reads_as_zero) = match &self.thin {
            Some(pool) => {
                log::info!(
                    "creating thin logical volume {shown} ({size} bytes virtual) in pool {}/{}",
                    self.vg,
                    pool.name
                );
                // Unprovisioned chunks of a thin LV read as zeros; with a
                // zeroing pool, so do the rest of the chunks a write
                // provisions. Then the writer may skip zeros.
                (lvcreate_thin_argv(&self.vg, &pool.name, name, size, job), pool.zeroes)
            }
            None => {
                log::info!("creating plain logical volume {shown} ({size} bytes)");
                // lvcreate zeroes only the start of a plain LV: the extents
                // may still hold an old LV's data.
                (lvcreate_argv(&self.vg, name, size, job), false)
            }
        };
        cmd::run(&argv).map_err(|e| VolumeError::backend(&shown, "create", e))?;
        log::info!("created logical volume {shown} ({size} bytes)");
        let size = match self.find(name)? {
            Some(lv) => lv.size,
            None => size,
        };
        Ok(Volume {
            name: name.into(),
            path: self.device(name),
            size,
            created: true,
            reads_as_zero,
        })
    }

    /// Only an LV carrying this job's tag is removed: the tag proves the
    /// job created it, whatever the journal says.
    fn remove_after_restart(&self, name: &str, job: &str) -> Result<bool, VolumeError> {
        let shown = self.describe(name);
        let job_tag = format!("lvp-job-{job}");
        match self.find(name)? {
            Some(lv) if lv.is_ours() && lv.tags.contains(&job_tag) => {
                cmd::run(&lvremove_argv(&self.vg, name))
                    .map_err(|e| VolumeError::backend(&shown, "remove", e))?;
                log::info!("removed logical volume {shown} left by interrupted job {job}");
                Ok(true)
            }
            Some(_) => {
                log::info!("leaving {shown}: it does not carry {job_tag}");
                Ok(false)
            }
            None => Ok(false),
        }
    }

    fn remove(&self, volume: &Volume) -> Result<(), VolumeError> {
        let shown = self.describe(&volume.name);
        match self.find(&volume.name)? {
            None => return Ok(()),
            Some(lv) if !lv.is_ours() => {
                log::error!("not removing {shown}: it lacks the {OWNER_TAG} tag");
                return Err(VolumeError::not_a_volume(&shown, "not tagged as ours"));
            }
            Some(_) => {}
        }
        cmd::run(&lvremove_argv(&self.vg, &volume.name))
            .map_err(|e| VolumeError::backend(&shown, "remove", e))?;
        log::info!("removed logical volume {shown}");
        Ok(())
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// An lvm2 report of `fields` for `vg` as JSON, sizes in plain bytes.
fn report_argv(tool: &str, fields: &str, vg: &str) -> Vec<String> {
    argv(&[tool, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, vg])
}

pub fn vgs_argv(vg: &str) -> Vec<String> {
    report_argv("vgs", "vg_name,vg_size,vg_free", vg)
}

pub fn lvs_argv(vg: &str) -> Vec<String> {
    report_argv("lvs", "lv_name,vg_name,lv_size,lv_attr,lv_tags", vg)
}

pub fn lvcreate_argv(vg: &str, name: &str, size: u64, job: &str) -> Vec<String> {
    let size = format!("{size}b");
    let job_tag = format!("lvp-job-{job}");
    argv(&[
        "lvcreate",
        "--yes",
        "--wipesignatures",
        "y",
        "--name",
        name,
        "--size",
        &size,
        "--addtag",
        OWNER_TAG,
        "--addtag",
        &job_tag,
        vg,
    ])
}

/// A new thin LV of `size` virtual bytes in `vg/pool`, with the same tags
/// as a plain one. No `--wipesignatures`: a new thin LV has no old bytes.
pub fn lvcreate_thin_argv(vg: &str, pool: &str, name: &str, size: u64, job: &str) -> Vec<String> {
    let size = format!("{size}b");
    let job_tag = format!("lvp-job-{job}");
    argv(&[
        "lvcreate",
        "--yes",
        "--type",
        "thin",
        "--virtualsize",
        &size,
        "--thinpool",
        pool,
        "--name",
        name,
        "--addtag",
        OWNER_TAG,
        "--addtag",
        &job_tag,
        vg,
    ])
}

/// Every LV of `vg` with what tells a thin pool apart: its segment type
/// and whether it zeroes new chunks.
pub fn pool_report_argv(vg: &str) -> Vec<String> {
    report_argv("lvs", "lv_name,segtype,zero", vg)
}

pub fn lvremove_argv(vg: &str, name: &str) -> Vec<String> {
    argv(&["lvremove", "--yes", &format!("{vg}/{name}")])
}

/// The LVs in an `lvs` JSON report.
pub fn parse_lvs(json: &str) -> Result<Vec<LvInfo>, String> {
    let report: Report =
        serde_json::from_str(json).map_err(|e| format!("unreadable lvs report: {e}"))?;
    let mut out = Vec::new();
    for row in report.report.into_iter().flat_map(|r| r.lv) {
        let row: LvRow =
            serde_json::from_value(row).map_err(|e| format!("unreadable lvs row: {e}"))?;
        let size = row.lv_size.trim().parse().map_err(|_| {
            format!("lvs size {:?} of {} is not a byte count", row.lv_size, row.lv_name)
        })?;
        let tags = row.lv_tags.split(',').filter(|t| !t.is_empty()).map(String::from).collect();
        out.push(LvInfo { name: row.lv_name, size, attr: row.lv_attr, tags });
    }
    Ok(out)
}

/// Pool `pool` of `vg` in a [`pool_report_argv`] report, if it is a thin
/// pool; otherwise a sentence naming `--thin-pool` that says what it is.
pub fn parse_thin_pool(json: &str, vg: &str, pool: &str) -> Result<ThinPool, String> {
    let report: Report =
        serde_json::from_str(json).map_err(|e| format!("unreadable lvs report: {e}"))?;
    let mut rows = Vec::new();
    for row in report.report.into_iter().flat_map(|r| r.lv) {
        let row: PoolRow =
            serde_json::from_value(row).map_err(|e| format!("unreadable lvs row: {e}"))?;
        rows.push(row);
    }
    let Some(row) = rows.into_iter().find(|r| r.lv_name == pool) else {
        return Err(format!(
            "--thin-pool {pool}: volume group {vg} has no logical volume {pool} \
             (create one with lvcreate --type thin-pool)"
        ));
    };
    if row.segtype != "thin-pool" {
        return Err(format!(
            "--thin-pool {pool}: {vg}/{pool} is a {} logical volume, not a thin pool",
            row.segtype
        ));
    }
    let zeroes = match row.zero.as_str() {
        "zero" | "1" => true,
        // Anything short of a clear yes means zeros must be written.
        "" | "0" | "unknown" => false,
        other => {
            return Err(format!(
                "--thin-pool {pool}: lvs shows {other:?} for the pool's zero field, \
                 expected \"zero\" or \"\""
            ))
        }
    };
    Ok(ThinPool { name: row.lv_name, zeroes })
}

/// Looks `pool` up in `vg` for [`LvmBackend::open`].
fn open_thin_pool(vg: &str, pool: &str) -> Result<ThinPool, String> {
    if pool.contains('/') {
        return Err(format!(
            "--thin-pool {pool}: give the pool's name inside --volume-group {vg}, without a \
             volume group"
        ));
    }
    let out = cmd::run(&pool_report_argv(vg))
        .map_err(|e| format!("--thin-pool {pool}: cannot list the LVs of {vg}: {e}"))?;
    let found = parse_thin_pool(&out.stdout, vg, pool)?;
    if found.zeroes {
        log::info!(
            "new volumes will be thin logical volumes in pool {vg}/{pool}, which zeroes new chunks"
        );
    } else {
        log::warn!("{}", non_zeroing_pool(vg, pool));
    }
    Ok(found)
}

fn non_zeroing_pool(vg: &str, pool: &str) -> String {
    format!(
        "--thin-pool {pool}: {vg}/{pool} does not zero new chunks, so a new thin LV cannot \
         skip zeros and is written in full; `lvchange --zero y {vg}/{pool}` lets it stay sparse"
    )
}

/// The free bytes of `vg` in a `vgs` JSON report.
pub fn parse_vgs(json: &str, vg: &str) -> Result<u64, String> {
    let report: Report =
        serde_json::from_str(json).map_err(|e| format!("unreadable vgs report: {e}"))?;
    let row = report
        .report
        .into_iter()
        .flat_map(|r| r.vg)
        .find(|row| row.vg_name == vg)
        .ok_or_else(|| format!("volume group {vg} not found"))?;
    row.vg_free
        .trim()
        .parse()
        .map_err(|_| format!("vgs free size {:?} is not a byte count", row.vg_free))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real lvm2 2.03.16 output; see tests/fixtures/lvm/README.md.
    const LVS: &str = include_str!("../../tests/fixtures/lvm/lvs-vg0.json");
    const LVS_OPEN: &str = include_str!("../../tests/fixtures/lvm/lvs-open.json");
    const LVS_EMPTY: &str = include_str!("../../tests/fixtures/lvm/lvs-empty.json");
    const VGS: &str = include_str!("../../tests/fixtures/lvm/vgs-vg0.json");
    const VGS_MISSING: &str = include_str!("../../tests/fixtures/lvm/vgs-missing.json");
    // Real output from inside the VM of scripts/lvm-vm-test.sh.
    const LVS_POOLS: &str = include_str!("../../tests/fixtures/lvm/lvs-pools.json");
    const LVS_THIN: &str = include_str!("../../tests/fixtures/lvm/lvs-thin.json");
    const LVS_OPEN_REAL: &str = include_str!("../../tests/fixtures/lvm/lvs-open-real.json");

    #[test]
    fn test_parse_lvs_report() {
        let lvs = parse_lvs(LVS).unwrap();
        assert_eq!(lvs.len(), 2);
        assert_eq!(lvs[0].name, "vm-one");
        assert_eq!(lvs[0].size, 104_857_600);
        assert!(lvs[0].is_ours(), "tagged by us");
        assert_eq!(lvs[0].tags[1], "lvp-job-550e8400-e29b-41d4-a716-446655440000");
        assert_eq!(lvs[1].size, 209_715_200);
        assert!(!lvs[1].is_ours() && lvs[1].tags.is_empty());
        // Without device-mapper lvm2 reports the open state as 'X' (unknown).
        assert!(!lvs[0].is_open());
        assert!(parse_lvs(LVS_EMPTY).unwrap().is_empty());
    }

    #[test]
    fn test_open_lv_is_detected() {
        let lvs = parse_lvs(LVS_OPEN).unwrap();
        assert!(lvs.iter().find(|l| l.name == "vm-one").unwrap().is_open());
        assert!(!lvs.iter().find(|l| l.name == "vm-two").unwrap().is_open());
    }

    #[test]
    fn test_open_lv_is_detected_on_real_output() {
        let lvs = parse_lvs(LVS_OPEN_REAL).unwrap();
        let open: Vec<&str> = lvs.iter().filter(|l| l.is_open()).map(|l| l.name.as_str()).collect();
        assert_eq!(open, ["vm-open"], "only the LV a process held open");
    }

    #[test]
    fn test_thin_pool_is_recognised_with_its_zeroing() {
        assert_eq!(
            parse_thin_pool(LVS_POOLS, "lvpvm", "pool"),
            Ok(ThinPool { name: "pool".into(), zeroes: true })
        );
        // lvcreate --zero n: lvm2 prints "" for the zero field.
        assert_eq!(
            parse_thin_pool(LVS_POOLS, "lvpvm", "pool-nz"),
            Ok(ThinPool { name: "pool-nz".into(), zeroes: false })
        );
    }

    #[test]
    fn test_thin_pool_refusals_name_the_flag() {
        assert_eq!(
            parse_thin_pool(LVS_POOLS, "lvpvm", "nosuch").unwrap_err(),
            "--thin-pool nosuch: volume group lvpvm has no logical volume nosuch \
             (create one with lvcreate --type thin-pool)"
        );
        assert_eq!(
            parse_thin_pool(LVS_POOLS, "lvpvm", "vm-raw").unwrap_err(),
            "--thin-pool vm-raw: lvpvm/vm-raw is a linear logical volume, not a thin pool"
        );
        // A VG without LVs has no pool either.
        assert!(parse_thin_pool(LVS_EMPTY, "vgempty", "pool").unwrap_err().contains("has no"));
        let odd = LVS_POOLS.replacen(r#""zero":"zero""#, r#""zero":"maybe""#, 1);
        assert!(parse_thin_pool(&odd, "lvpvm", "pool").unwrap_err().contains("\"maybe\""));
        assert!(parse_thin_pool("{", "lvpvm", "pool").is_err());
    }

    #[test]
    fn test_parse_lvs_reads_thin_lvs() {
        let lvs = parse_lvs(LVS_THIN).unwrap();
        let thin = lvs.iter().find(|l| l.name == "vm-thin").unwrap();
        assert_eq!((thin.size, thin.attr.as_str()), (2_147_483_648, "Vwi-a-tz--"));
        assert!(thin.is_ours() && !thin.is_open());
        // The pool itself is open (its thin LVs use it) but is not ours.
        let pool = lvs.iter().find(|l| l.name == "pool").unwrap();
        assert!(pool.is_open() && !pool.is_ours());
    }

    #[test]
    fn test_parse_vgs_report() {
        assert_eq!(parse_vgs(VGS, "vg0"), Ok(1_828_716_544));
        assert_eq!(
            parse_vgs(VGS_MISSING, "nosuchvg").unwrap_err(),
            "volume group nosuchvg not found"
        );
        assert!(parse_lvs("not json").is_err());
    }

    #[test]
    fn test_exact_argument_vectors() {
        assert_eq!(
            vgs_argv("vg0").join(" "),
            "vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free vg0"
        );
        assert_eq!(
            lvs_argv("vg0").join(" "),
            "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_attr,lv_tags vg0"
        );
        assert_eq!(
            lvcreate_argv("vg0", "vm-1", 53_687_091_200, "j1"),
            [
                "lvcreate",
                "--yes",
                "--wipesignatures",
                "y",
                "--name",
                "vm-1",
                "--size",
                "53687091200b",
                "--addtag",
                "libvirt-volume-provisioner",
                "--addtag",
                "lvp-job-j1",
                "vg0",
            ]
        );
        assert_eq!(lvremove_argv("vg0", "vm-1"), ["lvremove", "--yes", "vg0/vm-1"]);
        assert_eq!(
            pool_report_argv("vg0").join(" "),
            "lvs --reportformat json --units b --nosuffix -o lv_name,segtype,zero vg0"
        );
        assert_eq!(
            lvcreate_thin_argv("vg0", "pool0", "vm-1", 53_687_091_200, "j1"),
            [
                "lvcreate",
                "--yes",
                "--type",
                "thin",
                "--virtualsize",
                "53687091200b",
                "--thinpool",
                "pool0",
                "--name",
                "vm-1",
                "--addtag",
                "libvirt-volume-provisioner",
                "--addtag",
                "lvp-job-j1",
                "vg0",
            ]
        );
    }
}
