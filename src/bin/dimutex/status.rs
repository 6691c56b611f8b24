//! `dimutex status` and `dimutex release --force`: what operators need.

use std::time::SystemTime;

use dimutex::{FencingToken, LockStatus};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::args::{ReleaseArgs, StatusArgs};
use crate::exit::{self, Failure};

pub async fn status(args: StatusArgs) -> Result<u8, Failure> {
    let target = &args.target;
    let (client, key) = crate::connect(target, None).await?;
    let object = format!(
        "gs://{}/{}",
        target.bucket,
        client
            .object_name(&key)
            .map_err(|e| Failure::usage(format!("invalid lock key {:?}: {e}", target.key)))?
    );
    let status = client
        .status(key.clone())
        .await
        .map_err(|e| Failure::from_lock_error(key.as_str(), e))?;
    let held = status.as_ref().is_some_and(LockStatus::is_live);
    if args.json {
        println!("{}", json(key.as_str(), &object, status.as_ref()));
    } else {
        print!("{}", human(key.as_str(), &object, status.as_ref()));
    }
    Ok(if held { 0 } else { exit::NO })
}

pub async fn release(args: ReleaseArgs) -> Result<u8, Failure> {
    if !args.force {
        return Err(Failure::usage(
            "release breaks a lock that may belong to a live process; add --force to confirm \
             (and --token T to delete only the lock with fencing token T)",
        ));
    }
    let (client, key) = crate::connect(&args.target, None).await?;
    let name = key.as_str();
    let fail = |e| match e {
        dimutex::Error::Held { .. } => Failure::new(
            exit::HELD,
            format!("lock {name:?} kept changing while we tried to delete it; try again"),
        ),
        e => Failure::from_lock_error(name, e),
    };
    // The delete is conditional on the token when one is given, so a newer holder's lock is
    // never deleted by accident.
    let token = args.token.map(FencingToken::from);
    if client
        .force_release(key.clone(), token)
        .await
        .map_err(fail)?
    {
        println!("released lock {name:?}");
        return Ok(0);
    }
    // Nothing deleted: say why.
    match (client.status(key.clone()).await.map_err(fail)?, token) {
        (Some(status), Some(wanted)) => println!(
            "lock {name:?} has token {}, not {wanted}; left in place",
            status.token()
        ),
        _ => println!("no lock {name:?} to release"),
    }
    Ok(exit::NO)
}

/// The text report.
fn human(key: &str, object: &str, status: Option<&LockStatus>) -> String {
    let Some(s) = status else {
        return format!("lock {key:?} is free\n  object:  {object}\n");
    };
    let owner = s
        .owner()
        .unwrap_or("(not recorded: written by Python dimutex)");
    let since = s.since().map_or_else(|| "unknown".to_owned(), format_human);
    let mut out = if s.is_live() {
        format!("lock {key:?} is held\n")
    } else {
        format!("lock {key:?} is free (the last holder's lease has expired)\n")
    };
    out += &format!("  object:  {object}\n");
    out += &format!("  owner:   {owner}\n");
    out += &format!("  since:   {since}\n");
    let expires = format_human(s.expires());
    if s.is_live() {
        out += &format!(
            "  until:   {expires} at most, unless refreshed (in {} s)\n",
            exit::ceil_secs(s.remaining())
        );
    } else {
        let ago = s
            .server_time()
            .duration_since(s.expires())
            .unwrap_or_default();
        out += &format!("  expired: {expires} ({} s ago)\n", ago.as_secs());
    }
    out += &format!("  token:   {}\n", s.token());
    out += &format!("  server time: {}\n", format_human(s.server_time()));
    out
}

/// The JSON report: one object, `held` is the answer.
fn json(key: &str, object: &str, status: Option<&LockStatus>) -> serde_json::Value {
    let Some(s) = status else {
        return serde_json::json!({
            "key": key,
            "object": object,
            "held": false,
            "state": "free",
            "owner": null,
            "since": null,
            "expires": null,
            "server_time": null,
            "remaining_secs": null,
            "token": null,
            "written_by_python": null,
        });
    };
    serde_json::json!({
        "key": key,
        "object": object,
        "held": s.is_live(),
        "state": if s.is_live() { "held" } else { "expired" },
        "owner": s.owner(),
        "since": s.since().map(format_rfc3339),
        "expires": format_rfc3339(s.expires()),
        "server_time": format_rfc3339(s.server_time()),
        "remaining_secs": s.remaining().as_secs_f64(),
        "token": s.token().get(),
        "written_by_python": s.written_by_python(),
    })
}

fn format_human(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] UTC"
        ))
        .unwrap_or_else(|_| format!("{t:?}"))
}

pub(crate) fn format_rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
