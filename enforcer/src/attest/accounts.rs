//! User and group names from `/etc/passwd` and `/etc/group` (no NSS: the daemon must not
//! block on a directory service while it decides).
#![forbid(unsafe_code)]

use std::{collections::HashMap, fs, path::Path};

/// Id-to-name tables of the local account databases.
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Accounts {
    /// Read `/etc/passwd` and `/etc/group`; a missing or unreadable file gives no names.
    #[must_use]
    pub fn load() -> Self {
        Self::from_files(Path::new("/etc/passwd"), Path::new("/etc/group"))
    }

    /// Read the given passwd and group files.
    #[must_use]
    pub fn from_files(passwd: &Path, group: &Path) -> Self {
        let read = |path: &Path| fs::read_to_string(path).unwrap_or_default();
        Self {
            users: parse_table(&read(passwd)),
            groups: parse_table(&read(group)),
        }
    }

    /// The name of user `uid`.
    #[must_use]
    pub fn user(&self, uid: u32) -> Option<&str> {
        self.users.get(&uid).map(String::as_str)
    }

    /// The name of group `gid`.
    #[must_use]
    pub fn group(&self, gid: u32) -> Option<&str> {
        self.groups.get(&gid).map(String::as_str)
    }
}

/// `name:x:id:...` lines to id -> name (the first name wins for a shared id).
fn parse_table(text: &str) -> HashMap<u32, String> {
    let mut table = HashMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if let Ok(id) = id.parse() {
            table.entry(id).or_insert_with(|| name.to_owned());
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::parse_table;

    #[test]
    fn parses_passwd_and_skips_junk() {
        let table = parse_table(
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nnobody:x:65534:65534::/:/bin/false\ntoor:x:0:0::/:/bin/sh\n",
        );
        assert_eq!(table.get(&0).map(String::as_str), Some("root"));
        assert_eq!(table.get(&65534).map(String::as_str), Some("nobody"));
        assert_eq!(table.len(), 2);
    }
}
