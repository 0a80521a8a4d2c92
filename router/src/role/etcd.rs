//! `branchgate role create|reset` with the catalog in etcd.
//!
//! 1. Take the role's lock (`<prefix>/locks/roles/<branch>/<role>`, on a lease): a second
//!    command for the same role fails at once, having changed nothing. Without it, two
//!    commands could each change the server and race on etcd, and the server could keep the
//!    loser's password while the catalog has the winner's.
//! 2. Read the catalog (one range read) and check it, the branch and the role, as for a file.
//! 3. Set the new password on the branch primary.
//! 4. Write the verifier in one transaction guarded by the role key's revision read in 2 (and
//!    the branch key's creation): a writer that does not take the lock (an import, etcdctl)
//!    and changed the role meanwhile makes it fail, and its change stands; the server is then
//!    given back the catalog's verifier, so server and catalog agree again.
//! 5. Release the lock (its lease; if the command dies, the lease expires).
//! 6. Wait (at most `--wait`) until every router live at that moment acknowledges the write's
//!    revision (`crate::fleet::acks`): the command returns once the routers that are up have
//!    the new verifier in force, or names those that refused it or did not answer.

use super::{
    branch_for, restore_on_server, set_on_server, Applied, EtcdWrite, Mode, RoleArgs, RoleError,
};
use crate::catalog::etcd::store::{block_on, RoleGuard};
use crate::catalog::etcd::{EtcdError, EtcdUrl, Store};
use crate::fleet::acks::wait_for_acks;

/// Creates or resets the role in the catalog at `url` (see the module's steps).
pub(super) fn apply(
    url: &EtcdUrl,
    args: &RoleArgs,
    mode: Mode,
    admin_password: Option<&str>,
) -> Result<Applied, RoleError> {
    block_on(async {
        let mut store = Store::connect(url).await?;
        let lock = store.lock_role(&args.branch, &args.role).await?;
        let outcome = locked(&mut store, url, args, mode, admin_password).await;
        store.unlock(lock).await;
        let mut applied = outcome?;
        if let Some(write) = &mut applied.etcd_write {
            if !args.wait.is_zero() {
                write.acks = Some(wait_for_acks(&mut store, write.revision, args.wait).await);
            }
        }
        Ok(applied)
    })?
}

/// Steps 2 to 4, with the lock held.
async fn locked(
    store: &mut Store,
    url: &EtcdUrl,
    args: &RoleArgs,
    mode: Mode,
    admin_password: Option<&str>,
) -> Result<Applied, RoleError> {
    let snapshot = store.read().await?;
    let layout = store.layout().clone();
    let catalog = snapshot.catalog(&layout).map_err(EtcdError::Catalog)?;
    let branch = branch_for(&catalog, &url.to_string(), args, mode)?;
    let primary = branch.primary;
    // The branch is in the catalog, so it has a key.
    let guard = RoleGuard::read(&snapshot, &layout, &args.branch, &args.role).ok_or_else(|| {
        RoleError::UnknownBranch {
            catalog: url.to_string(),
            branch: args.branch.clone(),
        }
    })?;
    let (password, verifier) = set_on_server(primary, args, mode, admin_password)?;
    let written = store
        .put_role(&args.branch, &args.role, &verifier.to_string(), guard)
        .await;
    match written {
        Ok(revision) => Ok(Applied {
            password,
            etcd_write: Some(EtcdWrite {
                revision,
                acks: None,
            }),
        }),
        Err(EtcdError::Conflict { .. }) => {
            let restored = restore(store, args, primary, admin_password).await;
            Err(RoleError::EtcdConflict {
                branch: args.branch.clone(),
                role: args.role.clone(),
                restored,
            })
        }
        Err(source) => Err(RoleError::EtcdNotUpdated { primary, source }),
    }
}

/// After a lost race: gives the server the verifier the catalog has now, if it has one.
async fn restore(
    store: &mut Store,
    args: &RoleArgs,
    primary: std::net::SocketAddr,
    admin_password: Option<&str>,
) -> bool {
    let key = store.layout().role_key(&args.branch, &args.role);
    let current = match store.read().await {
        Ok(snapshot) => snapshot.entries.get(&key).map(|e| e.value.clone()),
        Err(error) => {
            tracing::warn!(%error, "cannot read the role's verifier back from etcd");
            return false;
        }
    };
    let Some(Ok(verifier)) = current.map(String::from_utf8) else {
        // The role was deleted from the catalog (or holds junk): the routers refuse it either
        // way, nothing to give back.
        return false;
    };
    match restore_on_server(primary, args, &verifier, admin_password) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "cannot give the server back the catalog's verifier");
            false
        }
    }
}
