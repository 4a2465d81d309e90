//! A small BTF reader: just enough to find struct member offsets and struct sizes in the running
//! kernel's type information, which is how the kernel programs learn where `nf_conn` keeps its
//! tuples on this kernel (Rust eBPF has no CO-RE relocations).
//!
//! Supports split BTF: kernel modules (`/sys/kernel/btf/nf_conntrack`) describe their types on
//! top of `vmlinux`, continuing its type ids and string offsets.

use aksnet_common::{KernelOffsets, CT_SPAN_MAX, OFFSET_ABSENT, TUPLE_FINGERPRINT_LEN};
use std::path::{Path, PathBuf};

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// The blob itself is broken: which one and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed BTF in {source_name}: {detail}")]
pub struct ParseError {
    source_name: String,
    detail: String,
}

/// A member path or struct cannot be resolved in otherwise valid BTF.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("{0} is a bitfield, which the kernel programs cannot read by byte offset")]
    Bitfield(String),
    #[error("{0} is not a struct or union, so it has no members")]
    NotComposite(String),
    #[error("type id {0} is out of range")]
    BadTypeId(u32),
    #[error("type chain at id {0} is too deep or cyclic")]
    TooDeep(u32),
    #[error("{0} has a type whose size the resolver does not compute (an array or a function)")]
    Unsized(String),
}

/// Why the agent cannot produce [`KernelOffsets`] for this kernel.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF {}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y; AKS kernels have it); use --source netlink on this kernel", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// `nf_conn` lives in the `nf_conntrack` module, whose BTF appears only once it is loaded.
    #[error("nf_conntrack is not loaded (kernel {kernel} has no {}): load it with `modprobe nf_conntrack`, or start the agent after kube-proxy has", module.display())]
    ConntrackNotLoaded { kernel: String, module: PathBuf },
    #[error("kernel {kernel}: struct nf_conntrack_tuple is {size} bytes, fewer than the {TUPLE_FINGERPRINT_LEN} the kernel programs read to recognise a connection; use --source netlink on this kernel")]
    ShortTuple { kernel: String, size: u32 },
    #[error("kernel {kernel}: cannot resolve required field {field}: {cause}")]
    MissingField {
        kernel: String,
        field: &'static str,
        #[source]
        cause: LookupError,
    },
    #[error("kernel {kernel}: {field} is {size} bytes, but the kernel programs read {reads}: this kernel lays the field out differently, so the eBPF capture would read wrong values; use --source netlink on this kernel")]
    FieldSize {
        kernel: String,
        field: &'static str,
        size: u32,
        reads: u32,
    },
    #[error("kernel {kernel}: the struct nf_conn fields the kernel programs use span {span} bytes, more than the {CT_SPAN_MAX} they read at once; use --source netlink on this kernel")]
    WideConn { kernel: String, span: u32 },
    #[error("kernel {kernel}: optional field {field} is unusable: {cause}")]
    BadOptionalField {
        kernel: String,
        field: &'static str,
        #[source]
        cause: LookupError,
    },
}

/// One BTF type, with what the resolver needs of its kind-specific data.
#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: u8,
    /// Size for INT/STRUCT/UNION/ENUM/FLOAT/DATASEC, referenced type id for the others.
    size_or_type: u32,
    /// INT: bit width of the value.
    int_bits: u32,
    /// STRUCT/UNION members.
    members: Vec<Member>,
}

#[derive(Clone, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// Non-zero for a bitfield declared with `kind_flag`.
    bitfield_size: u32,
}

/// Parsed BTF: `vmlinux`, or a module's split BTF merged onto its base.
#[derive(Clone, Debug)]
pub struct Btf {
    /// Index 0 is `void`; type id N is `types[N]`.
    types: Vec<Type>,
    strings: Vec<u8>,
    /// How many of `types` are vmlinux's: all of them, or the base's in merged split BTF.
    base_types: usize,
}

impl Btf {
    /// Parses standalone BTF (such as `/sys/kernel/btf/vmlinux`). `source_name` names the blob
    /// in errors.
    pub fn parse(data: &[u8], source_name: &str) -> Result<Btf, ParseError> {
        let empty = Btf {
            types: vec![void()],
            strings: Vec::new(),
            base_types: 0,
        };
        let mut btf = empty.extend(data, source_name, false)?;
        btf.base_types = btf.types.len();
        Ok(btf)
    }

    /// Parses a module's split BTF on top of `base`: its type ids and string offsets continue
    /// where the base's end.
    pub fn parse_split(base: &Btf, data: &[u8], source_name: &str) -> Result<Btf, ParseError> {
        base.clone().extend(data, source_name, true)
    }

    fn extend(mut self, data: &[u8], source_name: &str, split: bool) -> Result<Btf, ParseError> {
        let err = |detail: String| ParseError {
            source_name: source_name.to_owned(),
            detail,
        };
        if data.len() < HEADER_LEN {
            return Err(err(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                data.len()
            )));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != MAGIC {
            let hint = if magic == MAGIC.swap_bytes() {
                " (big-endian BTF is not supported)"
            } else {
                ""
            };
            return Err(err(format!("bad magic {magic:#06x}{hint}")));
        }
        if data[2] != 1 {
            return Err(err(format!("unsupported version {}", data[2])));
        }
        let u32_at = |off: usize| u32::from_le_bytes(data[off..off + 4].try_into().unwrap());
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
        let section = |name: &str, off: usize, len: usize| {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if hdr_len >= HEADER_LEN && end <= data.len() => {
                    Ok(&data[start..end])
                }
                _ => Err(err(format!(
                    "{name} section ({len} bytes at {off} after a {hdr_len}-byte header) \
                     lies outside the {}-byte blob",
                    data.len()
                ))),
            }
        };
        let type_data = section("type", type_off, type_len)?;
        let str_data = section("string", str_off, str_len)?;
        // Offset 0 is the empty name; a split blob's offsets continue its base's, so its own
        // section may be empty and need not start with NUL.
        if (!split && str_data.first() != Some(&0)) || str_data.last().is_some_and(|&b| b != 0) {
            return Err(err(
                "string section must start (unless split) and end with a NUL byte".into(),
            ));
        }

        let mut reader = Reader {
            data: type_data,
            pos: 0,
        };
        while reader.pos < type_data.len() {
            let id = self.types.len();
            let ty = read_type(&mut reader)
                .map_err(|detail| err(format!("type id {id} (byte {}): {detail}", reader.pos)))?;
            self.types.push(ty);
        }
        self.strings.extend_from_slice(str_data);
        Ok(self)
    }

    /// Reads and parses a BTF file; `base` for a module's split BTF.
    pub fn from_file(path: &Path, base: Option<&Btf>) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.to_owned(),
            source,
        })?;
        let name = path.display().to_string();
        Ok(match base {
            Some(base) => Btf::parse_split(base, &data, &name)?,
            None => Btf::parse(&data, &name)?,
        })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn get(&self, id: u32) -> Result<&Type, LookupError> {
        self.types
            .get(id as usize)
            .ok_or(LookupError::BadTypeId(id))
    }

    /// The complete struct (not a forward declaration) named `name`.
    fn find_struct(&self, name: &str) -> Result<u32, LookupError> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name)
            .map(|i| i as u32)
            .ok_or_else(|| LookupError::NoStruct(name.to_owned()))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut id: u32) -> Result<u32, LookupError> {
        for _ in 0..32 {
            match self.get(id)?.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = self.get(id)?.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(LookupError::TooDeep(id))
    }

    /// `sizeof(struct name)`.
    pub fn struct_size(&self, name: &str) -> Result<u32, LookupError> {
        Ok(self.get(self.find_struct(name)?)?.size_or_type)
    }

    /// Byte offset of a member path such as `nf_conn.tuplehash` or `net.ns.inum` (the first
    /// component is the struct). Members of anonymous structs and unions are found as if they
    /// were direct members, as in C.
    pub fn member_offset(&self, path: &str) -> Result<u32, LookupError> {
        self.resolve(path).map(|(offset, _, _)| offset)
    }

    /// Byte offset and size of a member path (see [`Btf::member_offset`]).
    pub fn member(&self, path: &str) -> Result<(u32, u32), LookupError> {
        let (offset, type_id, walked) = self.resolve(path)?;
        Ok((offset, self.type_size(type_id, &walked)?))
    }

    /// Byte offset, type id and the path walked, for a member path.
    fn resolve(&self, path: &str) -> Result<(u32, u32, String), LookupError> {
        let mut parts = path.split('.');
        let strukt = parts.next().unwrap_or_default();
        let mut type_id = self.find_struct(strukt)?;
        let mut walked = strukt.to_owned();
        let mut bits = 0u32;
        for member in parts {
            let composite = self.strip(type_id)?;
            if !matches!(self.get(composite)?.kind, KIND_STRUCT | KIND_UNION) {
                return Err(LookupError::NotComposite(walked));
            }
            let (found, offset) =
                self.find_member(composite, member, 0)?
                    .ok_or_else(|| LookupError::NoMember {
                        strukt: walked.clone(),
                        member: member.to_owned(),
                    })?;
            walked = format!("{walked}.{member}");
            if found.bitfield_size != 0 || self.is_int_bitfield(found.type_id)? {
                return Err(LookupError::Bitfield(walked));
            }
            bits += offset;
            type_id = found.type_id;
        }
        if !bits.is_multiple_of(8) {
            return Err(LookupError::Bitfield(walked));
        }
        Ok((bits / 8, type_id, walked))
    }

    /// `sizeof` a member's type: what a read of the whole member covers.
    fn type_size(&self, type_id: u32, walked: &str) -> Result<u32, LookupError> {
        let ty = self.get(self.strip(type_id)?)?;
        match ty.kind {
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION | KIND_FLOAT => {
                Ok(ty.size_or_type)
            }
            // The kernel programs run on 64-bit kernels only (x86_64, arm64).
            KIND_PTR => Ok(8),
            _ => Err(LookupError::Unsized(walked.to_owned())),
        }
    }

    /// Whether vmlinux itself (not a module's split BTF merged on top) has function `name`:
    /// where aya can attach fentry/fexit.
    pub fn vmlinux_has_function(&self, name: &str) -> bool {
        self.types[..self.base_types]
            .iter()
            .any(|t| t.kind == KIND_FUNC && self.name(t.name_off) == name)
    }

    /// Finds `name` in a struct/union, descending into anonymous members; returns the member and
    /// its bit offset from the start of `composite`.
    fn find_member(
        &self,
        composite: u32,
        name: &str,
        depth: u32,
    ) -> Result<Option<(&Member, u32)>, LookupError> {
        if depth > 16 {
            return Err(LookupError::TooDeep(composite));
        }
        for m in &self.get(composite)?.members {
            let member_name = self.name(m.name_off);
            if member_name == name {
                return Ok(Some((m, m.bit_offset)));
            }
            if member_name.is_empty() {
                let inner = self.strip(m.type_id)?;
                if matches!(self.get(inner)?.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((found, off)) = self.find_member(inner, name, depth + 1)? {
                        return Ok(Some((found, m.bit_offset + off)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Bitfields described without `kind_flag` carry their width in the INT type.
    fn is_int_bitfield(&self, type_id: u32) -> Result<bool, LookupError> {
        let ty = self.get(self.strip(type_id)?)?;
        Ok(ty.kind == KIND_INT && ty.int_bits != ty.size_or_type * 8)
    }
}

fn void() -> Type {
    Type {
        name_off: 0,
        kind: 0,
        size_or_type: 0,
        int_bits: 0,
        members: Vec::new(),
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, String> {
        let bytes = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| format!("truncated: type section ends at byte {}", self.data.len()))?;
        self.pos += 4;
        Ok(u32::from_le_bytes(bytes.try_into().unwrap()))
    }

    fn skip(&mut self, records: u32, record_len: usize) -> Result<(), String> {
        let len = records as usize * record_len;
        if self.pos + len > self.data.len() {
            return Err(format!(
                "truncated: {records} records of {record_len} bytes overrun the type section"
            ));
        }
        self.pos += len;
        Ok(())
    }
}

fn read_type(r: &mut Reader) -> Result<Type, String> {
    let name_off = r.u32()?;
    let info = r.u32()?;
    let size_or_type = r.u32()?;
    let vlen = info & 0xffff;
    let kind = ((info >> 24) & 0x1f) as u8;
    let kind_flag = info >> 31 == 1;
    let mut ty = Type {
        name_off,
        kind,
        size_or_type,
        ..void()
    };
    match kind {
        KIND_INT => ty.int_bits = r.u32()? & 0xff,
        // struct btf_array: element type, index type, element count.
        KIND_ARRAY => r.skip(1, 12)?,
        KIND_STRUCT | KIND_UNION => {
            for _ in 0..vlen {
                let (name_off, type_id, offset) = (r.u32()?, r.u32()?, r.u32()?);
                let (bit_offset, bitfield_size) = if kind_flag {
                    (offset & 0xff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                ty.members.push(Member {
                    name_off,
                    type_id,
                    bit_offset,
                    bitfield_size,
                });
            }
        }
        KIND_ENUM | KIND_FUNC_PROTO => r.skip(vlen, 8)?,
        KIND_DATASEC | KIND_ENUM64 => r.skip(vlen, 12)?,
        KIND_VAR | KIND_DECL_TAG => r.skip(1, 4)?,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
        other => return Err(format!("unknown kind {other}")),
    }
    Ok(ty)
}

/// Where the kernel's BTF lives: `vmlinux` and per-module split BTF files.
#[derive(Clone, Debug)]
pub struct BtfSource {
    pub dir: PathBuf,
    /// Names the kernel in errors (its release, normally).
    pub kernel: String,
}

impl BtfSource {
    /// `/sys/kernel/btf` of the running kernel.
    pub fn running_kernel() -> BtfSource {
        BtfSource {
            dir: PathBuf::from("/sys/kernel/btf"),
            kernel: kernel_release(),
        }
    }

    /// Loads `vmlinux`, merged with the `nf_conntrack` module's split BTF when `nf_conn` is
    /// not built into the kernel; that module must be loaded.
    pub fn load(&self) -> Result<Btf, BtfError> {
        let vmlinux = Btf::from_file(&self.dir.join("vmlinux"), None)?;
        if vmlinux.find_struct("nf_conn").is_ok() {
            return Ok(vmlinux);
        }
        let module = self.dir.join("nf_conntrack");
        if !module.exists() {
            return Err(BtfError::ConntrackNotLoaded {
                kernel: self.kernel.clone(),
                module,
            });
        }
        Btf::from_file(&module, Some(&vmlinux))
    }

    /// Resolves every offset the kernel programs need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        resolve_offsets(&self.load()?, &self.kernel)
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "(unknown release)".to_owned())
}

/// Fills [`KernelOffsets`] from `btf`. `kernel` names the kernel in errors.
pub fn resolve_offsets(btf: &Btf, kernel: &str) -> Result<KernelOffsets, BtfError> {
    // Each field with the number of bytes the kernel programs read from it: a kernel whose
    // field differs in size would be misread, so it is refused.
    let sized = |field: &'static str, reads: u32, (offset, size): (u32, u32)| {
        if size == reads {
            Ok(offset)
        } else {
            Err(BtfError::FieldSize {
                kernel: kernel.to_owned(),
                field,
                size,
                reads,
            })
        }
    };
    let required = |field: &'static str, reads: u32| match btf.member(field) {
        Ok(found) => sized(field, reads, found),
        Err(cause) => Err(BtfError::MissingField {
            kernel: kernel.to_owned(),
            field,
            cause,
        }),
    };
    // Compiled out by kernel config: absent is fine, but present-and-unreadable is not.
    let optional = |field: &'static str, reads: u32| match btf.member(field) {
        Ok(found) => sized(field, reads, found),
        Err(LookupError::NoMember { .. }) => Ok(OFFSET_ABSENT),
        Err(cause) => Err(BtfError::BadOptionalField {
            kernel: kernel.to_owned(),
            field,
            cause,
        }),
    };
    let tuplehash_size = btf
        .struct_size("nf_conntrack_tuple_hash")
        .map_err(|cause| BtfError::MissingField {
            kernel: kernel.to_owned(),
            field: "sizeof(nf_conntrack_tuple_hash)",
            cause,
        })?;
    let tuplehash_tuple = btf
        .member_offset("nf_conntrack_tuple_hash.tuple")
        .map_err(|cause| BtfError::MissingField {
            kernel: kernel.to_owned(),
            field: "nf_conntrack_tuple_hash.tuple",
            cause,
        })?;
    // The fingerprint read must stay inside the tuple, which must stay inside its hash entry.
    let tuple_size =
        btf.struct_size("nf_conntrack_tuple")
            .map_err(|cause| BtfError::MissingField {
                kernel: kernel.to_owned(),
                field: "sizeof(nf_conntrack_tuple)",
                cause,
            })?;
    if (tuple_size as usize) < TUPLE_FINGERPRINT_LEN
        || tuplehash_tuple + tuple_size > tuplehash_size
    {
        return Err(BtfError::ShortTuple {
            kernel: kernel.to_owned(),
            size: tuple_size,
        });
    }
    let mut offsets = KernelOffsets {
        skb_nfct: required("sk_buff._nfct", 8)?,
        skb_iif: required("sk_buff.skb_iif", 4)?,
        skb_len: required("sk_buff.len", 4)?,
        netdev_ifindex: required("net_device.ifindex", 4)?,
        netdev_net: optional("net_device.nd_net.net", 8)?,
        // Not read whole: the tuples inside it are, at the offsets below.
        ct_tuplehash: btf.member_offset("nf_conn.tuplehash").map_err(|cause| {
            BtfError::MissingField {
                kernel: kernel.to_owned(),
                field: "nf_conn.tuplehash",
                cause,
            }
        })?,
        tuplehash_size,
        tuplehash_tuple,
        ct_status: required("nf_conn.status", 8)?,
        ct_zone_id: optional("nf_conn.zone.id", 2)?,
        ct_mark: optional("nf_conn.mark", 4)?,
        ct_net: required("nf_conn.ct_net.net", 8)?,
        net_ns_inum: required("net.ns.inum", 4)?,
        tuple_src_u3: required("nf_conntrack_tuple.src.u3", 16)?,
        tuple_src_port: required("nf_conntrack_tuple.src.u.all", 2)?,
        tuple_src_l3num: required("nf_conntrack_tuple.src.l3num", 2)?,
        tuple_dst_u3: required("nf_conntrack_tuple.dst.u3", 16)?,
        tuple_dst_port: required("nf_conntrack_tuple.dst.u.all", 2)?,
        tuple_dst_protonum: required("nf_conntrack_tuple.dst.protonum", 1)?,
        ct_span_start: 0,
        ct_span_len: 0,
    };
    (offsets.ct_span_start, offsets.ct_span_len) =
        ct_span(&offsets).map_err(|span| BtfError::WideConn {
            kernel: kernel.to_owned(),
            span,
        })?;
    Ok(offsets)
}

/// The programs' one read of an `nf_conn`: (start, length) covering every field they use,
/// from an 8-byte aligned start (so that each field keeps its natural alignment in the copy);
/// `Err(length)` when that is more than [`CT_SPAN_MAX`] bytes.
fn ct_span(o: &KernelOffsets) -> Result<(u32, u32), u32> {
    // Each tuple is hashed (the fingerprint) and decoded field by field.
    let tuple_end = [
        TUPLE_FINGERPRINT_LEN as u32,
        o.tuple_src_u3 + 16,
        o.tuple_src_port + 2,
        o.tuple_src_l3num + 2,
        o.tuple_dst_u3 + 16,
        o.tuple_dst_port + 2,
        o.tuple_dst_protonum + 1,
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    let orig = o.ct_tuplehash + o.tuplehash_tuple;
    let fields = [
        (orig, tuple_end),
        (orig + o.tuplehash_size, tuple_end),
        (o.ct_status, 8),
        (o.ct_net, 8),
        (o.ct_zone_id, 2),
        (o.ct_mark, 4),
    ];
    let present = || fields.into_iter().filter(|&(at, _)| at != OFFSET_ABSENT);
    let start = present().map(|(at, _)| at).min().unwrap_or_default() & !7;
    let end = present()
        .map(|(at, len)| at + len)
        .max()
        .unwrap_or_default();
    let len = end - start;
    if len <= CT_SPAN_MAX {
        Ok((start, len))
    } else {
        Err(len)
    }
}

#[cfg(test)]
mod tests;
