//! The `lvm` backend: each volume is a logical volume `<vg>/<name>`.
//!
//! Everything goes through the lvm2 command-line tools with JSON reports
//! (`--reportformat json --units b --nosuffix`), so sizes are exact byte
//! counts. LVs this daemon creates carry the tag [`OWNER_TAG`] and one
//! naming the job; an LV without our tag is never removed. An LV whose
//! device is open (the `o` in the sixth `lv_attr` character: a running VM)
//! is never written.

use std::path::PathBuf;

use serde::Deserialize;

use super::{size_is_reusable, Volume, VolumeBackend, VolumeError};
use crate::cmd::{self, CmdError};

/// Tag on every LV this daemon creates.
pub const OWNER_TAG: &str = "libvirt-volume-provisioner";

pub struct LvmBackend {
    vg: String,
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
    lv: Vec<LvRow>,
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

#[derive(Deserialize)]
struct VgRow {
    vg_name: String,
    vg_free: String,
}

impl LvmBackend {
    /// Checks that `vg` exists (with `vgs`) and returns a backend for it.
    pub fn open(vg: &str) -> Result<LvmBackend, String> {
        let out = cmd::run(&vgs_argv(vg)).map_err(|e| match e {
            CmdError::NotFound { .. } => {
                "--volume-group: lvm tools not found (install lvm2)".to_string()
            }
            other => format!("--volume-group {vg}: volume group not usable: {other}"),
        })?;
        let free = parse_vgs(&out.stdout, vg).map_err(|e| format!("--volume-group {vg}: {e}"))?;
        log::info!("volume group {vg} has {free} bytes free");
        Ok(LvmBackend { vg: vg.to_string() })
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
        parse_vgs(&out.stdout, &self.vg).map(|_| ())
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
        cmd::run(&lvcreate_argv(&self.vg, name, size, job))
            .map_err(|e| VolumeError::backend(&shown, "create", e))?;
        log::info!("created logical volume {shown} ({size} bytes)");
        let size = match self.find(name)? {
            Some(lv) => lv.size,
            None => size,
        };
        // lvcreate zeroes only the start of a plain LV: old data may remain.
        Ok(Volume {
            name: name.into(),
            path: self.device(name),
            size,
            created: true,
            reads_as_zero: false,
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

pub fn vgs_argv(vg: &str) -> Vec<String> {
    argv(&[
        "vgs",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "vg_name,vg_size,vg_free",
        vg,
    ])
}

pub fn lvs_argv(vg: &str) -> Vec<String> {
    argv(&[
        "lvs",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "lv_name,vg_name,lv_size,lv_attr,lv_tags",
        vg,
    ])
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

pub fn lvremove_argv(vg: &str, name: &str) -> Vec<String> {
    argv(&["lvremove", "--yes", &format!("{vg}/{name}")])
}

/// The LVs in an `lvs` JSON report.
pub fn parse_lvs(json: &str) -> Result<Vec<LvInfo>, String> {
    let report: Report =
        serde_json::from_str(json).map_err(|e| format!("unreadable lvs report: {e}"))?;
    let mut out = Vec::new();
    for row in report.report.into_iter().flat_map(|r| r.lv) {
        let size = row.lv_size.trim().parse().map_err(|_| {
            format!("lvs size {:?} of {} is not a byte count", row.lv_size, row.lv_name)
        })?;
        let tags = row.lv_tags.split(',').filter(|t| !t.is_empty()).map(String::from).collect();
        out.push(LvInfo { name: row.lv_name, size, attr: row.lv_attr, tags });
    }
    Ok(out)
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
    }
}
