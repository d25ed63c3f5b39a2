//! Keeping libvirt's view current: after a volume is created or removed,
//! `virsh pool-refresh <pool>` makes `virsh vol-list` show what is there.
//! Without `--libvirt-pool`, or without virsh, nothing is refreshed, and
//! the daemon says so once at start. A failed refresh is logged; it never
//! fails a job (the volume itself is fine).

use crate::cmd::{self, CmdError};

pub struct PoolRefresher {
    pool: Option<String>,
}

impl PoolRefresher {
    /// Checks once whether refreshing can work, and says what will happen.
    pub fn new(pool: Option<String>) -> PoolRefresher {
        let Some(name) = pool else {
            log::info!("no --libvirt-pool: libvirt storage pools are not refreshed");
            return PoolRefresher { pool: None };
        };
        match cmd::run(&["virsh".to_string(), "--version".to_string()]) {
            Ok(_) => {
                log::info!("libvirt pool {name} is refreshed after volumes change");
                PoolRefresher { pool: Some(name) }
            }
            Err(CmdError::NotFound { .. }) => {
                log::warn!("--libvirt-pool {name}: virsh not found; the pool is not refreshed");
                PoolRefresher { pool: None }
            }
            Err(e) => {
                log::warn!(
                    "--libvirt-pool {name}: virsh does not run ({e}); the pool is not refreshed"
                );
                PoolRefresher { pool: None }
            }
        }
    }

    /// Refreshes the pool after `what` happened to a volume.
    pub fn refresh(&self, what: &str) {
        let Some(pool) = &self.pool else { return };
        let argv = vec!["virsh".to_string(), "pool-refresh".to_string(), pool.clone()];
        match cmd::run(&argv) {
            Ok(_) => log::info!("refreshed libvirt pool {pool} after {what}"),
            Err(e) => log::warn!("could not refresh libvirt pool {pool} after {what}: {e}"),
        }
    }
}
