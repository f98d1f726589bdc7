//! The container's user, resolved through the image's own `/etc/passwd`
//! and `/etc/group` as runc resolves it. Pure.
//!
//! - `""` is root;
//! - `NAME` or `UID`, optionally `:GROUP` or `:GID`;
//! - a name must exist in the file, a number need not (its group is then 0,
//!   its home `/`);
//! - the primary group is the passwd entry's unless one is given;
//! - supplementary groups are those of `/etc/group` that list the user.

/// Who the container runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
    /// Home directory (`HOME` when the env sets none).
    pub home: String,
}

/// Why a user spec does not resolve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// A user name the image's `/etc/passwd` lacks.
    #[error("unable to find user {0}: no matching entries in the image's /etc/passwd")]
    NoUser(String),
    /// A group name the image's `/etc/group` lacks.
    #[error("unable to find group {0}: no matching entries in the image's /etc/group")]
    NoGroup(String),
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(file: &str) -> impl Iterator<Item = Passwd<'_>> {
    file.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some(Passwd {
            name: f.first()?,
            uid: f.get(2)?.parse().ok()?,
            gid: f.get(3)?.parse().ok()?,
            home: f.get(5).copied().unwrap_or("/"),
        })
    })
}

struct Group<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn group_entries(file: &str) -> impl Iterator<Item = Group<'_>> {
    file.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        Some(Group {
            name: f.first()?,
            gid: f.get(2)?.parse().ok()?,
            members: f
                .get(3)
                .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
        })
    })
}

/// Resolves `spec` against the image's passwd and group files (either may
/// be empty when the image has none).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|p| p.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|p| p.name == user)
                .ok_or_else(|| UserError::NoUser(user.to_owned()))?,
        ),
    };
    let uid = match &entry {
        Some(p) => p.uid,
        None => user.parse().unwrap_or(0),
    };
    let gid = match grp.filter(|g| !g.is_empty()) {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::NoGroup(g.to_owned()))?,
        },
        None => entry.as_ref().map_or(0, |p| p.gid),
    };
    let mut groups: Vec<u32> = match &entry {
        Some(p) => group_entries(group)
            .filter(|e| e.members.contains(&p.name))
            .map(|e| e.gid)
            .collect(),
        None => Vec::new(),
    };
    groups.sort_unstable();
    groups.dedup();
    Ok(Identity {
        uid,
        gid,
        groups,
        home: entry
            .map(|p| p.home)
            .filter(|h| !h.is_empty())
            .unwrap_or("/")
            .to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n\
                          broken line\n\
                          nohome:x:1002:1002::\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:1001:app,other\nwheel:x:10:app\n";

    fn id(uid: u32, gid: u32, groups: &[u32], home: &str) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn names_and_numbers_resolve_as_runc_resolves_them() {
        let r = |s| resolve(s, PASSWD, GROUP);
        assert_eq!(r(""), Ok(id(0, 0, &[], "/root")));
        assert_eq!(r("app"), Ok(id(1000, 1000, &[10, 1001], "/home/app")));
        assert_eq!(r("1000"), Ok(id(1000, 1000, &[10, 1001], "/home/app")));
        assert_eq!(r("app:extra"), Ok(id(1000, 1001, &[10, 1001], "/home/app")));
        assert_eq!(r("app:42"), Ok(id(1000, 42, &[10, 1001], "/home/app")));
        assert_eq!(r("4242"), Ok(id(4242, 0, &[], "/")));
        assert_eq!(r("4242:4243"), Ok(id(4242, 4243, &[], "/")));
        assert_eq!(r("nohome"), Ok(id(1002, 1002, &[], "/")));
    }

    #[test]
    fn unknown_names_are_errors_that_say_where_they_were_looked_for() {
        assert_eq!(
            resolve("ghost", PASSWD, GROUP).unwrap_err().to_string(),
            "unable to find user ghost: no matching entries in the image's /etc/passwd"
        );
        assert_eq!(
            resolve("app:ghosts", PASSWD, GROUP),
            Err(UserError::NoGroup("ghosts".into()))
        );
        assert_eq!(resolve("app", "", ""), Err(UserError::NoUser("app".into())));
    }

    #[test]
    fn an_image_without_passwd_still_runs_numeric_users() {
        assert_eq!(resolve("", "", ""), Ok(id(0, 0, &[], "/")));
        assert_eq!(
            resolve("65534:65534", "", ""),
            Ok(id(65534, 65534, &[], "/"))
        );
    }
}
