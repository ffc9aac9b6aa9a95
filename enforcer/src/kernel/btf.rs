//! The offsets of the few kernel structure members the cgroup tracepoints read, found in the
//! running kernel's own type information (`/sys/kernel/btf/vmlinux`).
//!
//! The programs are compiled once for every kernel, so they cannot know where `struct cgroup`
//! keeps its `kn` pointer on this one; C programs get that from libbpf's CO-RE relocations,
//! which the Rust toolchain does not emit. The loader instead reads the offsets here and
//! writes them to the `ENF_LAYOUT` map before the tracepoints run. This is a reader of the BTF
//! format (`Documentation/bpf/btf.rst`) reduced to what that needs: struct and union members,
//! through anonymous members, by name.
#![forbid(unsafe_code)]

use std::{collections::HashMap, path::Path};

use enforcer_ebpf::Layout;

/// Where the running kernel publishes its BTF.
pub(super) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// `BTF_MAGIC`.
const MAGIC: u16 = 0xeb9f;
/// Kinds of `struct btf_type` this reader needs to tell apart.
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Errors of reading kernel BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data is not BTF this reader understands.
    #[error("malformed BTF: {0}")]
    Malformed(String),
    /// A structure or member the programs need is not in the kernel's BTF.
    #[error("the kernel's BTF has no member {member} in struct {structure}")]
    Missing {
        /// The structure.
        structure: &'static str,
        /// The member.
        member: &'static str,
    },
    /// A member the programs read is a bit field.
    #[error("member {member} of struct {structure} is not byte aligned")]
    Unaligned {
        /// The structure.
        structure: &'static str,
        /// The member.
        member: &'static str,
    },
}

/// The [`Layout`] of the running kernel.
pub(super) fn running_layout() -> Result<Layout, BtfError> {
    let path = Path::new(VMLINUX_BTF);
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    layout(&data)
}

/// The [`Layout`] described by the BTF blob `data`.
pub(super) fn layout(data: &[u8]) -> Result<Layout, BtfError> {
    let btf = Btf::parse(data)?;
    Ok(Layout {
        cgroup_kn: btf.member_offset("cgroup", "kn")?,
        cgroup_root: btf.member_offset("cgroup", "root")?,
        root_hierarchy_id: btf.member_offset("cgroup_root", "hierarchy_id")?,
        kernfs_id: btf.member_offset("kernfs_node", "id")?,
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        valid: 1,
    })
}

/// One type: its kind, name, the type it refers to (for modifiers) and its members.
struct Type<'a> {
    kind: u32,
    name: &'a str,
    refers_to: u32,
    members: Vec<Member<'a>>,
}

/// One member of a struct or union: name (empty when anonymous), type and bit offset.
struct Member<'a> {
    name: &'a str,
    type_id: u32,
    bit_offset: u32,
}

/// The types of a BTF blob, by id (id 0 is `void`), and structs by name.
struct Btf<'a> {
    types: Vec<Type<'a>>,
    structs: HashMap<&'a str, u32>,
}

/// A little-endian reader of `u16`/`u32` fields at byte offsets.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u32_at(&self, at: usize) -> Result<u32, BtfError> {
        self.0
            .get(at..at + 4)
            .and_then(|bytes| bytes.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {at}")))
    }
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let bytes = Bytes(data);
        let magic = data
            .get(0..2)
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
            .ok_or_else(|| BtfError::Malformed("empty".into()))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed(format!(
                "magic {magic:#06x}, expected {MAGIC:#06x} (little-endian BTF)"
            )));
        }
        let header_len = bytes.u32_at(4)? as usize;
        let type_off = header_len + bytes.u32_at(8)? as usize;
        let type_len = bytes.u32_at(12)? as usize;
        let str_off = header_len + bytes.u32_at(16)? as usize;
        let str_len = bytes.u32_at(20)? as usize;
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or_else(|| BtfError::Malformed("string section out of bounds".into()))?;
        let name = |offset: u32| -> Result<&'a str, BtfError> {
            let tail = strings
                .get(offset as usize..)
                .ok_or_else(|| BtfError::Malformed(format!("name offset {offset}")))?;
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            std::str::from_utf8(&tail[..end])
                .map_err(|_| BtfError::Malformed(format!("name at {offset} is not UTF-8")))
        };

        let void = Type {
            kind: 0,
            name: "",
            refers_to: 0,
            members: Vec::new(),
        };
        let mut types = vec![void];
        let mut structs = HashMap::new();
        let end = type_off + type_len;
        let mut at = type_off;
        while at < end {
            let info = bytes.u32_at(at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                kind,
                name: name(bytes.u32_at(at)?)?,
                refers_to: bytes.u32_at(at + 8)?,
                members: Vec::new(),
            };
            at += 12;
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for index in 0..vlen {
                    let member = at + 12 * index;
                    let offset = bytes.u32_at(member + 8)?;
                    ty.members.push(Member {
                        name: name(bytes.u32_at(member)?)?,
                        type_id: bytes.u32_at(member + 4)?,
                        bit_offset: if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        },
                    });
                }
            }
            at += trailing_bytes(kind, vlen)?;
            if kind == KIND_STRUCT && !ty.name.is_empty() && !ty.members.is_empty() {
                let id = u32::try_from(types.len())
                    .map_err(|_| BtfError::Malformed("too many types".into()))?;
                structs.entry(ty.name).or_insert(id);
            }
            types.push(ty);
        }
        Ok(Self { types, structs })
    }

    /// The byte offset of `member` in `structure`, looking through anonymous members.
    fn member_offset(
        &self,
        structure: &'static str,
        member: &'static str,
    ) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing { structure, member };
        let id = *self.structs.get(structure).ok_or_else(missing)?;
        let bits = self.find(id, member, 0).ok_or_else(missing)?;
        if bits % 8 != 0 {
            return Err(BtfError::Unaligned { structure, member });
        }
        Ok(bits / 8)
    }

    /// The bit offset of `member` in the struct or union `id`, plus `base`.
    fn find(&self, id: u32, member: &str, base: u32) -> Option<u32> {
        let ty = self.types.get(id as usize)?;
        for candidate in &ty.members {
            let offset = base + candidate.bit_offset;
            if candidate.name == member {
                return Some(offset);
            }
            if candidate.name.is_empty()
                && let Some(found) = self.find(self.strip(candidate.type_id), member, offset)
            {
                return Some(found);
            }
        }
        None
    }

    /// `id` with typedefs and qualifiers taken off.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(ty)
                    if matches!(
                        ty.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = ty.refers_to;
                }
                _ => break,
            }
        }
        id
    }
}

/// How many bytes follow a `struct btf_type` of `kind` with `vlen` entries.
fn trailing_bytes(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        // int, var, decl_tag: one u32
        1 | 14 | 17 => 4,
        // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag: nothing
        2 | 7..=12 | 16 | 18 => 0,
        // array: type, index type, element count
        3 => 12,
        // struct, union: name, type, offset; datasec: type, offset, size; enum64: name, lo, hi
        4 | 5 | 15 | 19 => 12 * vlen,
        // enum: name, value; func_proto: name, type
        6 | 13 => 8 * vlen,
        other => return Err(BtfError::Malformed(format!("unknown type kind {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::{BtfError, MAGIC, layout};

    /// A minimal BTF blob builder: strings (starting with the empty name) and types.
    struct Blob {
        strings: Vec<u8>,
        types: Vec<u8>,
    }

    impl Blob {
        fn new() -> Self {
            Self {
                strings: vec![0],
                types: Vec::new(),
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let offset = u32::try_from(self.strings.len()).unwrap();
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            offset
        }

        fn push(&mut self, words: &[u32]) {
            for word in words {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
        }

        /// `struct name { (member, type id, bit offset)... }`, or a union.
        fn composite(&mut self, union: bool, name: &str, members: &[(&str, u32, u32)]) {
            let name = self.name(name);
            let kind = if union { 5 } else { 4 };
            let info = (kind << 24) | u32::try_from(members.len()).unwrap();
            self.push(&[name, info, 64]);
            for &(member, type_id, offset) in members {
                let member = self.name(member);
                self.push(&[member, type_id, offset]);
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            let type_len = u32::try_from(self.types.len()).unwrap();
            let str_len = u32::try_from(self.strings.len()).unwrap();
            for word in [24, 0, type_len, type_len, str_len] {
                out.extend_from_slice(&u32::to_le_bytes(word));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_unions() {
        let mut blob = Blob::new();
        // 1: union { u64 id; }  (anonymous)
        blob.composite(true, "", &[("id", 0, 0)]);
        // 2: kernfs_node { count @0, <anon union> @64 }
        blob.composite(false, "kernfs_node", &[("count", 0, 0), ("", 1, 64)]);
        blob.composite(
            false,
            "cgroup",
            &[("flags", 0, 0), ("kn", 0, 128), ("root", 0, 192)],
        );
        blob.composite(
            false,
            "cgroup_root",
            &[("kf_root", 0, 0), ("hierarchy_id", 0, 96)],
        );
        blob.composite(false, "task_struct", &[("pid", 0, 800), ("tgid", 0, 832)]);
        let layout = layout(&blob.bytes()).expect("layout");
        assert_eq!(layout.cgroup_kn, 16);
        assert_eq!(layout.cgroup_root, 24);
        assert_eq!(layout.root_hierarchy_id, 12);
        assert_eq!(layout.kernfs_id, 8);
        assert_eq!(layout.task_tgid, 104);
        assert_eq!(layout.valid, 1);
    }

    #[test]
    fn a_missing_member_is_named() {
        let mut blob = Blob::new();
        blob.composite(false, "cgroup", &[("flags", 0, 0)]);
        match layout(&blob.bytes()) {
            Err(BtfError::Missing { structure, member }) => {
                assert_eq!((structure, member), ("cgroup", "kn"));
            }
            other => panic!("expected a missing member, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(layout(&[]), Err(BtfError::Malformed(_))));
        assert!(matches!(layout(&[0; 32]), Err(BtfError::Malformed(_))));
        let mut truncated = Blob::new().bytes();
        truncated[12] = 200;
        assert!(matches!(layout(&truncated), Err(BtfError::Malformed(_))));
    }

    #[test]
    fn the_running_kernel_has_every_member() {
        let layout = super::running_layout().expect("the running kernel's BTF");
        assert_eq!(layout.valid, 1);
        assert!(layout.cgroup_kn > 0 && layout.task_tgid > 0, "{layout:?}");
    }
}
