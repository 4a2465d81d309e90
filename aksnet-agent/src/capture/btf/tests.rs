//! Tests against hand-made BTF blobs (a tiny builder below) and this machine's kernel.

use super::*;
use std::collections::HashMap;

/// Writes BTF the way the kernel lays it out, so layouts can be varied field by field.
struct Builder {
    types: Vec<u8>,
    strings: Vec<u8>,
    names: HashMap<String, u32>,
    /// Split BTF: string offsets and type ids continue the base's.
    str_base: u32,
    next_id: u32,
}

/// A member: name, type id, offset in bits (or `bitfield_size << 24 | bit_offset`).
type M<'a> = (&'a str, u32, u32);

fn at(name: &str, type_id: u32, byte: u32) -> M<'_> {
    (name, type_id, byte * 8)
}

impl Builder {
    fn new() -> Builder {
        Builder {
            types: Vec::new(),
            strings: vec![0],
            names: HashMap::new(),
            str_base: 0,
            next_id: 1,
        }
    }

    fn split(base: &Builder) -> Builder {
        Builder {
            types: Vec::new(),
            strings: Vec::new(),
            // Names the base has are referenced there, as the kernel's split BTF does.
            names: base.names.clone(),
            str_base: base.str_base + base.strings.len() as u32,
            next_id: base.next_id,
        }
    }

    fn name(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        if let Some(&off) = self.names.get(s) {
            return off;
        }
        let off = self.str_base + self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        self.names.insert(s.to_owned(), off);
        off
    }

    fn raw(
        &mut self,
        name: &str,
        kind: u8,
        flag: bool,
        vlen: usize,
        sz: u32,
        extra: &[u32],
    ) -> u32 {
        let name_off = self.name(name);
        let info = (u32::from(flag) << 31) | (u32::from(kind) << 24) | vlen as u32;
        for word in [name_off, info, sz].iter().chain(extra) {
            self.types.extend_from_slice(&word.to_le_bytes());
        }
        self.next_id += 1;
        self.next_id - 1
    }

    fn int(&mut self, name: &str, size: u32) -> u32 {
        self.raw(name, KIND_INT, false, 0, size, &[size * 8])
    }

    fn ptr(&mut self, target: u32) -> u32 {
        self.raw("", KIND_PTR, false, 0, target, &[])
    }

    fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
        self.raw("", KIND_ARRAY, false, 0, 0, &[elem, index, n])
    }

    fn composite(&mut self, kind: u8, name: &str, size: u32, members: &[M], flag: bool) -> u32 {
        let mut extra = Vec::new();
        for &(member, type_id, offset) in members {
            extra.extend([self.name(member), type_id, offset]);
        }
        self.raw(name, kind, flag, members.len(), size, &extra)
    }

    fn strukt(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
        self.composite(KIND_STRUCT, name, size, members, false)
    }

    fn union(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
        self.composite(KIND_UNION, name, size, members, false)
    }

    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        let type_len = self.types.len() as u32;
        for word in [24, 0, type_len, type_len, self.strings.len() as u32] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// How the made-up kernel differs from the default one.
#[derive(Clone, Copy)]
struct Layout {
    /// Bytes inserted before the fields of sk_buff, net_device, net and nf_conn.
    shift: u32,
    zone: bool,
    mark: bool,
    status: bool,
    /// `sizeof(nf_conn.status)`: 8 (an `unsigned long`) on every 64-bit kernel.
    status_bytes: u32,
    /// `sizeof(struct nf_conntrack_tuple)`.
    tuple: u32,
}

const DEFAULT: Layout = Layout {
    shift: 0,
    zone: true,
    mark: true,
    status: true,
    status_bytes: 8,
    tuple: 40,
};

/// Type ids of the vmlinux part that the conntrack part refers to.
struct Core {
    u8: u32,
    u16: u32,
    u32: u32,
    u64: u32,
    net: u32,
}

/// sk_buff (with `_nfct` and `skb_iif` two anonymous levels deep, as in the kernel),
/// net_device and net.
fn add_core(b: &mut Builder, l: Layout) -> Core {
    let s = l.shift;
    let (u8, u16, u32, u64) = (
        b.int("unsigned char", 1),
        b.int("short unsigned int", 2),
        b.int("unsigned int", 4),
        b.int("long long unsigned int", 8),
    );
    let skb_ptr = b.ptr(0);
    let pair = b.strukt("", 16, &[at("next", skb_ptr, 0), at("prev", skb_ptr, 8)]);
    let head = b.union("", 16, &[at("", pair, 0), at("list", u64, 0)]);
    let ct = b.strukt("", 16, &[at("_nfct", u64, 0), at("skb_iif", u32, 8)]);
    let ct_union = b.union("", 16, &[at("", ct, 0), at("headers", u64, 0)]);
    b.strukt(
        "sk_buff",
        64 + s,
        &[
            at("", head, 0),
            at("len", u32, 16 + s),
            at("mark", u32, 20 + s),
            at("", ct_union, 32 + s),
        ],
    );
    let ns_common = b.strukt(
        "ns_common",
        24,
        &[
            at("stashed", u64, 0),
            at("ops", skb_ptr, 8),
            at("inum", u32, 16),
        ],
    );
    let net = b.strukt(
        "net",
        40 + s,
        &[at("passive", u32, 0), at("ns", ns_common, 8 + s)],
    );
    let bytes16 = b.array(u8, u32, 16);
    let net_ptr = b.ptr(net);
    let pnet = b.strukt("", 8, &[at("net", net_ptr, 0)]);
    let pnet = b.raw("possible_net_t", KIND_TYPEDEF, false, 0, pnet, &[]);
    b.strukt(
        "net_device",
        32 + s,
        &[
            at("name", bytes16, 0),
            at("ifindex", u32, 16 + s),
            at("nd_net", pnet, 24 + s),
        ],
    );
    Core {
        u8,
        u16,
        u32,
        u64,
        net,
    }
}

/// nf_conn and its tuple types, the way CONFIG_NF_CONNTRACK builds them.
fn add_conntrack(b: &mut Builder, c: &Core, l: Layout) {
    let s = l.shift;
    let words = b.array(c.u32, c.u32, 4);
    let addr = b.union(
        "nf_inet_addr",
        16,
        &[at("all", words, 0), at("ip", c.u32, 0)],
    );
    let proto = b.union("nf_conntrack_man_proto", 2, &[at("all", c.u16, 0)]);
    let man = b.strukt(
        "nf_conntrack_man",
        20,
        &[
            at("u3", addr, 0),
            at("u", proto, 16),
            at("l3num", c.u16, 18),
        ],
    );
    let dst = b.strukt(
        "",
        20,
        &[
            at("u3", addr, 0),
            at("u", proto, 16),
            at("protonum", c.u8, 18),
            at("dir", c.u8, 19),
        ],
    );
    let tuple = b.strukt(
        "nf_conntrack_tuple",
        l.tuple,
        &[at("src", man, 0), at("dst", dst, 20)],
    );
    let bytes16 = b.array(c.u8, c.u32, 16);
    let hash = b.strukt(
        "nf_conntrack_tuple_hash",
        56,
        &[at("hnnode", bytes16, 0), at("tuple", tuple, 16)],
    );
    let hashes = b.array(hash, c.u32, 2);
    let zone = b.strukt(
        "nf_conntrack_zone",
        4,
        &[at("id", c.u16, 0), at("flags", c.u8, 2), at("dir", c.u8, 3)],
    );
    // possible_net_t is a typedef of an anonymous struct, reached here through a const.
    let net_ptr = b.ptr(c.net);
    let pnet = b.strukt("", 8, &[at("net", net_ptr, 0)]);
    let pnet = b.raw("possible_net_t", KIND_TYPEDEF, false, 0, pnet, &[]);
    let pnet = b.raw("", KIND_CONST, false, 0, pnet, &[]);
    let mut members = vec![at("ct_general", c.u32, 0), at("tuplehash", hashes, 16 + s)];
    if l.zone {
        members.push(at("zone", zone, 12 + s));
    }
    if l.status {
        let status = if l.status_bytes == 4 { c.u32 } else { c.u64 };
        members.push(at("status", status, 128 + s));
    }
    members.push(at("ct_net", pnet, 136 + s));
    if l.mark {
        members.push(at("mark", c.u32, 168 + s));
    }
    b.strukt("nf_conn", 200 + s, &members);
}

fn expected(l: Layout) -> KernelOffsets {
    let s = l.shift;
    KernelOffsets {
        skb_nfct: 32 + s,
        skb_iif: 40 + s,
        skb_len: 16 + s,
        netdev_ifindex: 16 + s,
        netdev_net: 24 + s,
        ct_tuplehash: 16 + s,
        tuplehash_size: 56,
        tuplehash_tuple: 16,
        ct_status: 128 + s,
        ct_zone_id: if l.zone { 12 + s } else { OFFSET_ABSENT },
        ct_mark: if l.mark { 168 + s } else { OFFSET_ABSENT },
        ct_net: 136 + s,
        net_ns_inum: 8 + s + 16,
        tuple_src_u3: 0,
        tuple_src_port: 16,
        tuple_src_l3num: 18,
        tuple_dst_u3: 20,
        tuple_dst_port: 36,
        tuple_dst_protonum: 38,
        // From the zone (or the original tuple) to the end of the mark (or ct_net).
        ct_span_start: if l.zone { 8 + s } else { 32 + s },
        ct_span_len: match (l.zone, l.mark) {
            (true, true) => 164,
            (true, false) => 136,
            (false, true) => 140,
            (false, false) => 112,
        },
    }
}

fn kernel(l: Layout) -> Vec<u8> {
    let mut b = Builder::new();
    let core = add_core(&mut b, l);
    add_conntrack(&mut b, &core, l);
    b.build()
}

#[test]
fn resolves_default_and_moved_layouts() {
    for shift in [0, 8, 40] {
        let layout = Layout { shift, ..DEFAULT };
        let btf = Btf::parse(&kernel(layout), "test").unwrap();
        assert_eq!(
            resolve_offsets(&btf, "test-kernel").unwrap(),
            expected(layout),
            "shift {shift}"
        );
        assert_eq!(btf.struct_size("nf_conn").unwrap(), 200 + shift);
    }
}

#[test]
fn finds_members_inside_anonymous_unions_and_structs() {
    let btf = Btf::parse(&kernel(DEFAULT), "test").unwrap();
    assert_eq!(btf.member_offset("sk_buff._nfct"), Ok(32));
    assert_eq!(btf.member_offset("sk_buff.prev"), Ok(8));
    assert_eq!(btf.member_offset("nf_conn.ct_net.net"), Ok(136));
    assert_eq!(
        btf.member_offset("sk_buff.nope"),
        Err(LookupError::NoMember {
            strukt: "sk_buff".into(),
            member: "nope".into()
        })
    );
    assert_eq!(
        btf.member_offset("sk_buff.len.x"),
        Err(LookupError::NotComposite("sk_buff.len".into()))
    );
}

#[test]
fn compiled_out_optional_fields_are_absent() {
    let layout = Layout {
        zone: false,
        mark: false,
        ..DEFAULT
    };
    let btf = Btf::parse(&kernel(layout), "test").unwrap();
    let offsets = resolve_offsets(&btf, "test-kernel").unwrap();
    assert_eq!(
        (offsets.ct_zone_id, offsets.ct_mark),
        (OFFSET_ABSENT, OFFSET_ABSENT)
    );
    assert_eq!(offsets, expected(layout));
}

#[test]
fn the_conn_span_covers_every_field_read_and_no_more_than_the_programs_read() {
    let offsets = expected(DEFAULT);
    let (start, len) = ct_span(&offsets).unwrap();
    assert_eq!((start, len), (8, 164));
    assert_eq!(start % 8, 0);
    let far_mark = KernelOffsets {
        ct_mark: 300,
        ..offsets
    };
    assert_eq!(ct_span(&far_mark), Err(296));
    let err = BtfError::WideConn {
        kernel: "6.1.0-test".into(),
        span: 296,
    }
    .to_string();
    assert!(
        err.contains("span 296 bytes") && err.ends_with("use --source netlink on this kernel"),
        "{err}"
    );
}

#[test]
fn missing_required_field_names_the_field_and_kernel() {
    let layout = Layout {
        status: false,
        ..DEFAULT
    };
    let btf = Btf::parse(&kernel(layout), "test").unwrap();
    let err = resolve_offsets(&btf, "6.1.0-test").unwrap_err().to_string();
    assert_eq!(
        err,
        "kernel 6.1.0-test: cannot resolve required field nf_conn.status: \
         struct nf_conn has no member status"
    );
    let mut b = Builder::new();
    add_core(&mut b, DEFAULT);
    let btf = Btf::parse(&b.build(), "test").unwrap();
    let err = resolve_offsets(&btf, "6.1.0-test").unwrap_err().to_string();
    assert!(err.contains("no struct nf_conn"), "{err}");
}

#[test]
fn a_field_of_another_size_than_the_programs_read_is_refused() {
    let layout = Layout {
        status_bytes: 4,
        ..DEFAULT
    };
    let btf = Btf::parse(&kernel(layout), "test").unwrap();
    assert_eq!(btf.member("nf_conn.status"), Ok((128, 4)));
    let err = resolve_offsets(&btf, "6.1.0-test").unwrap_err();
    assert!(
        matches!(
            err,
            BtfError::FieldSize {
                field: "nf_conn.status",
                size: 4,
                reads: 8,
                ..
            }
        ),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.starts_with(
            "kernel 6.1.0-test: nf_conn.status is 4 bytes, but the kernel programs read 8"
        ) && err.ends_with("use --source netlink on this kernel"),
        "{err}"
    );
}

#[test]
fn member_sizes_follow_typedefs_and_pointers() {
    let btf = Btf::parse(&kernel(DEFAULT), "test").unwrap();
    // possible_net_t -> const -> anonymous struct -> pointer.
    assert_eq!(btf.member("nf_conn.ct_net.net"), Ok((136, 8)));
    assert_eq!(btf.member("nf_conntrack_tuple.src.u3"), Ok((0, 16)));
    assert_eq!(btf.member("nf_conntrack_tuple.dst.protonum"), Ok((38, 1)));
    assert_eq!(
        btf.member("nf_conn.tuplehash"),
        Err(LookupError::Unsized("nf_conn.tuplehash".into()))
    );
}

#[test]
fn only_vmlinux_functions_count_as_vmlinux_functions() {
    let mut base = Builder::new();
    let core = add_core(&mut base, DEFAULT);
    base.raw("nf_hook_slow", KIND_FUNC, false, 0, 0, &[]);
    let mut module = Builder::split(&base);
    add_conntrack(&mut module, &core, DEFAULT);
    module.raw("nf_ct_delete", KIND_FUNC, false, 0, 0, &[]);
    let vmlinux = Btf::parse(&base.build(), "vmlinux").unwrap();
    let merged = Btf::parse_split(&vmlinux, &module.build(), "nf_conntrack").unwrap();
    assert!(merged.vmlinux_has_function("nf_hook_slow"));
    assert!(!merged.vmlinux_has_function("nf_ct_delete"));
    // A struct of that name is not a function.
    assert!(!merged.vmlinux_has_function("sk_buff"));
}

#[test]
fn bitfields_are_refused_and_do_not_shift_later_members() {
    let mut b = Builder::new();
    let u32 = b.int("unsigned int", 4);
    let three_bits = b.raw("u3bits", KIND_INT, false, 0, 4, &[3]);
    // kind_flag: offset = bitfield_size << 24 | bit_offset
    b.composite(
        KIND_STRUCT,
        "flagged",
        8,
        &[
            ("a", u32, 3 << 24),
            ("b", u32, (5 << 24) | 3),
            ("c", u32, 32),
        ],
        true,
    );
    b.strukt("plain", 12, &[at("d", three_bits, 0), at("e", u32, 4)]);
    let btf = Btf::parse(&b.build(), "test").unwrap();
    assert_eq!(
        btf.member_offset("flagged.a"),
        Err(LookupError::Bitfield("flagged.a".into()))
    );
    assert_eq!(
        btf.member_offset("flagged.b"),
        Err(LookupError::Bitfield("flagged.b".into()))
    );
    assert_eq!(btf.member_offset("flagged.c"), Ok(4));
    assert_eq!(
        btf.member_offset("plain.d"),
        Err(LookupError::Bitfield("plain.d".into()))
    );
    assert_eq!(btf.member_offset("plain.e"), Ok(4));
}

#[test]
fn every_kind_is_parsed_past() {
    let mut b = Builder::new();
    let int = b.int("int", 4);
    b.raw("v", KIND_VOLATILE, false, 0, int, &[]);
    b.raw("", KIND_RESTRICT, false, 0, int, &[]);
    b.raw("color", KIND_ENUM, false, 2, 4, &[0, 0, 0, 1]);
    let proto = b.raw("", KIND_FUNC_PROTO, false, 2, int, &[0, int, 0, int]);
    b.raw("f", KIND_FUNC, false, 0, proto, &[]);
    let var = b.raw("x", KIND_VAR, false, 0, int, &[1]);
    b.raw(".data", KIND_DATASEC, false, 1, 4, &[var, 0, 4]);
    b.raw("double", KIND_FLOAT, false, 0, 8, &[]);
    b.raw("tag", KIND_DECL_TAG, false, 0, var, &[u32::MAX]);
    let tagged = b.raw("user", KIND_TYPE_TAG, false, 0, int, &[]);
    b.raw("big", KIND_ENUM64, false, 1, 8, &[0, 1, 2]);
    b.raw("fwd", KIND_FWD, false, 0, 0, &[]);
    b.strukt("last", 8, &[at("first", int, 0), at("second", tagged, 4)]);
    let btf = Btf::parse(&b.build(), "test").unwrap();
    assert_eq!(btf.member_offset("last.second"), Ok(4));
    assert_eq!(btf.struct_size("last"), Ok(8));
    // A forward declaration is not the struct.
    assert_eq!(
        btf.struct_size("fwd"),
        Err(LookupError::NoStruct("fwd".into()))
    );
}

/// A fresh directory with `vmlinux` (and `nf_conntrack` when given), removed on drop.
struct BtfDir(PathBuf);

impl BtfDir {
    fn new(tag: &str, vmlinux: &[u8], module: Option<&[u8]>) -> BtfDir {
        let dir = std::env::temp_dir().join(format!("aksnet-btf-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), vmlinux).unwrap();
        if let Some(module) = module {
            std::fs::write(dir.join("nf_conntrack"), module).unwrap();
        }
        BtfDir(dir)
    }

    fn source(&self) -> BtfSource {
        BtfSource {
            dir: self.0.clone(),
            kernel: "test-kernel".into(),
        }
    }
}

impl Drop for BtfDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn conntrack_in_split_module_btf() {
    let layout = Layout {
        shift: 8,
        ..DEFAULT
    };
    let mut base = Builder::new();
    let core = add_core(&mut base, layout);
    let mut module = Builder::split(&base);
    add_conntrack(&mut module, &core, layout);
    // The module reuses the base's "mark" string (sk_buff.mark): a cross-blob string offset.
    assert!(module.names["mark"] < module.str_base);
    let dir = BtfDir::new("split", &base.build(), Some(&module.build()));
    assert_eq!(dir.source().kernel_offsets().unwrap(), expected(layout));

    // Without the module file, the module is not loaded, and the error says what to do.
    std::fs::remove_file(dir.0.join("nf_conntrack")).unwrap();
    let err = dir.source().kernel_offsets().unwrap_err();
    assert!(
        matches!(err, BtfError::ConntrackNotLoaded { .. }),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.starts_with("nf_conntrack is not loaded")
            && err.contains("modprobe nf_conntrack")
            && err.contains("after kube-proxy")
            && err.contains("test-kernel"),
        "{err}"
    );
}

#[test]
fn a_tuple_shorter_than_the_fingerprint_read_is_refused() {
    let layout = Layout {
        tuple: 32,
        ..DEFAULT
    };
    let btf = Btf::parse(&kernel(layout), "test").unwrap();
    let err = resolve_offsets(&btf, "test-kernel").unwrap_err();
    assert!(
        matches!(err, BtfError::ShortTuple { size: 32, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("--source netlink"), "{err}");
}

#[test]
fn built_in_conntrack_ignores_a_module_file() {
    let broken_module = [0u8; 4];
    let dir = BtfDir::new("builtin", &kernel(DEFAULT), Some(&broken_module));
    assert_eq!(dir.source().kernel_offsets().unwrap(), expected(DEFAULT));
}

#[test]
fn missing_btf_file_says_where_and_why() {
    let source = BtfSource {
        dir: PathBuf::from("/nonexistent/aksnet-btf"),
        kernel: "test-kernel".into(),
    };
    let err = source.kernel_offsets().unwrap_err();
    assert!(matches!(err, BtfError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/aksnet-btf/vmlinux"));
    assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"));
}

#[test]
fn malformed_blobs_give_clear_errors() {
    let good = kernel(DEFAULT);
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut blob = good.clone();
        edit(&mut blob);
        blob
    };
    let type_len = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            good[..10].to_vec(),
            "10 bytes, shorter than the 24-byte header",
        ),
        (with(&|b| b[0] = 0), "bad magic"),
        (
            with(&|b| b[..2].copy_from_slice(&MAGIC.to_be_bytes())),
            "big-endian BTF is not supported",
        ),
        (with(&|b| b[2] = 2), "unsupported version 2"),
        (with(&|b| b.truncate(b.len() - 5)), "string section"),
        (
            with(&|b| {
                // Declare the type section 2 bytes shorter: the last record is cut.
                b[12..16].copy_from_slice(&(type_len as u32 - 2).to_le_bytes());
            }),
            "truncated",
        ),
        (
            with(&|b| b[24 + 7] = 25), // first type's info: kind 25
            "type id 1 (byte 12): unknown kind 25",
        ),
        (
            with(&|b| *b.last_mut().unwrap() = b'x'),
            "end with a NUL byte",
        ),
    ];
    for (blob, want) in cases {
        let err = Btf::parse(&blob, "blob.btf").unwrap_err().to_string();
        assert!(err.starts_with("malformed BTF in blob.btf: "), "{err}");
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }
}

#[test]
fn this_machines_kernel_btf_is_consistent() {
    let source = BtfSource::running_kernel();
    let btf = source.load().expect("this machine has kernel BTF");
    let off = resolve_offsets(&btf, &source.kernel).unwrap();
    let size = |name| btf.struct_size(name).unwrap();
    // nf_conn: both tuple hashes lie inside it and before status, which comes before ct_net.
    assert!(off.ct_tuplehash + 2 * off.tuplehash_size <= off.ct_status);
    assert!(off.ct_status < off.ct_net && off.ct_net < size("nf_conn"));
    assert!(off.ct_mark == OFFSET_ABSENT || off.ct_mark < size("nf_conn"));
    assert!(off.ct_zone_id == OFFSET_ABSENT || off.ct_zone_id < off.ct_tuplehash);
    // The tuple fits its hash entry, and its fields fit the tuple in declaration order.
    assert_eq!(off.tuplehash_size, size("nf_conntrack_tuple_hash"));
    let tuple = size("nf_conntrack_tuple");
    assert!(off.tuplehash_tuple + tuple <= off.tuplehash_size);
    assert_eq!(off.tuple_src_u3, 0);
    assert_eq!(off.tuple_src_port, off.tuple_src_u3 + 16);
    assert!(off.tuple_src_port < off.tuple_src_l3num && off.tuple_src_l3num < off.tuple_dst_u3);
    assert_eq!(off.tuple_dst_port, off.tuple_dst_u3 + 16);
    assert!(off.tuple_dst_protonum < tuple);
    // sk_buff, net_device and net fields lie inside their structs.
    for field in [off.skb_nfct, off.skb_iif, off.skb_len] {
        assert!(field < size("sk_buff"));
    }
    assert!(off.netdev_ifindex < size("net_device"));
    assert!(off.netdev_net < size("net_device"));
    // The one read of an nf_conn stays inside it.
    assert!(off.ct_span_start + off.ct_span_len <= size("nf_conn"));
    assert!(off.net_ns_inum < size("net"));
    eprintln!("{} {off:?}", source.kernel);
}
