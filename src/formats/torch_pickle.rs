//! Reading PyTorch `torch.save` files without executing them.
//!
//! Just enough of PyTorch's zip serialization (a stored zip with `<archive>/data.pkl` and one
//! record per storage) and of pickle protocol 2–5 to read tensors, dicts, lists, strings and
//! numbers. Nothing is imported or called: globals are checked against an allow-list as they
//! are read, and the few allowed ones are interpreted here.
//!
//! The zip container is read with the `zip` crate; the pickle is interpreted here because a
//! general unpickler would run code, and candle's reader does not keep dict insertion order
//! (which fixes concept token ids).
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

type R<T> = std::result::Result<T, String>;

#[derive(Clone, Debug)]
pub struct StorageRef {
    pub dtype: Option<DType>,
    pub type_name: String,
    pub key: String,
    pub numel: usize,
}

#[derive(Clone, Debug)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A pickled value. Containers are shared, as in Python: the memo and the stack may both
/// refer to a dict that is filled after it was memoised.
type Shared<T> = Rc<RefCell<Vec<T>>>;

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Shared<Value>),
    Dict(Shared<(Value, Value)>),
    Global(String, String),
    Storage(StorageRef),
    Tensor(TensorRef),
    Mark,
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::None => write!(f, "None"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Tuple(_) => write!(f, "a tuple"),
            Value::List(_) => write!(f, "a list"),
            Value::Dict(_) => write!(f, "a dict"),
            Value::Global(m, n) => write!(f, "{m}.{n}"),
            Value::Storage(_) => write!(f, "a storage"),
            Value::Tensor(t) => write!(f, "a tensor of shape {:?}", t.size),
            Value::Mark => write!(f, "a mark"),
        }
    }
}

fn storage_dtype(name: &str) -> Option<Option<DType>> {
    Some(match name {
        "FloatStorage" => Some(DType::F32),
        "HalfStorage" => Some(DType::F16),
        "BFloat16Storage" => Some(DType::BF16),
        "DoubleStorage" => Some(DType::F64),
        "LongStorage" => Some(DType::I64),
        "ByteStorage" => Some(DType::U8),
        // Readable as pickle values, but not as concept rows.
        "IntStorage" | "ShortStorage" | "CharStorage" | "BoolStorage" => None,
        _ => return None,
    })
}

fn allowed_global(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict") | ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_parameter")
    ) || (module == "torch" && storage_dtype(name).is_some())
}

pub struct TorchFile<'a> {
    zip: RefCell<zip::ZipArchive<std::io::Cursor<&'a [u8]>>>,
    /// `<archive>/` prefix of every record.
    prefix: String,
    root: Value,
}

impl<'a> TorchFile<'a> {
    pub fn open(data: &'a [u8]) -> R<Self> {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data)).map_err(|e| format!("not a zip archive: {e}"))?;
        let pkl = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
            .ok_or("no data.pkl record (not a torch.save file)")?
            .to_string();
        let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
        if let Some(order) = read_record(&mut zip, &format!("{prefix}byteorder"))? {
            if order != b"little" {
                return Err(format!("byte order {:?} is not supported", String::from_utf8_lossy(&order)));
            }
        }
        let bytes = read_record(&mut zip, &pkl)?.ok_or("data.pkl vanished")?;
        let root = Unpickler::new(&bytes).run().map_err(|e| format!("{pkl}: {e}"))?;
        Ok(TorchFile { zip: RefCell::new(zip), prefix, root })
    }

    pub fn root(&self) -> Value {
        self.root.clone()
    }

    /// The tensor's values from its storage record (contiguous layouts only).
    pub fn tensor(&self, t: &TensorRef, device: &Device) -> R<Tensor> {
        let s = &t.storage;
        let dtype = s.dtype.ok_or_else(|| format!("has storage type {}, not a floating-point tensor", s.type_name))?;
        let name = format!("{}data/{}", self.prefix, s.key);
        let bytes = read_record(&mut self.zip.borrow_mut(), &name)?.ok_or_else(|| format!("storage record {name} is missing"))?;
        let too_big = || format!("has an impossible size {:?} at offset {}", t.size, t.offset);
        let numel = t.size.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(too_big)?;
        // Strides of size-1 dims are irrelevant; every other dim must be row-major.
        let mut expect = 1usize;
        for (&d, &st) in t.size.iter().zip(&t.stride).rev() {
            if d != 1 && st != expect {
                return Err(format!("is stored non-contiguously (shape {:?}, stride {:?})", t.size, t.stride));
            }
            expect = expect.saturating_mul(d);
        }
        let es = dtype.size_in_bytes();
        let stop = t.offset.checked_add(numel).ok_or_else(too_big)?;
        let (start, end) = (t.offset.checked_mul(es).ok_or_else(too_big)?, stop.checked_mul(es).ok_or_else(too_big)?);
        if stop > s.numel || end > bytes.len() {
            return Err(format!(
                "needs elements {}..{stop} of storage {name}, which holds {} (file truncated?)",
                t.offset,
                bytes.len() / es
            ));
        }
        let out = Tensor::from_raw_buffer(&bytes[start..end], dtype, &t.size, device).map_err(|e| e.to_string())?;
        out.to_dtype(DType::F32).map_err(|e| e.to_string())
    }
}

// ----------------------------------------------------------------------------------------
// pickle
// ----------------------------------------------------------------------------------------

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u64, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), memo: HashMap::new() }
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(format!("truncated at byte {} (needs {n} more bytes)", self.pos));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> R<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("unterminated GLOBAL")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "non-UTF-8 GLOBAL name")?.to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: u64) -> R<Value> {
        let n = usize::try_from(n).map_err(|_| "string length overflows")?;
        let b = self.take(n)?;
        Ok(Value::Str(String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")?))
    }

    fn pop(&mut self) -> R<Value> {
        match self.stack.pop() {
            Some(Value::Mark) | None => Err(format!("stack underflow at byte {}", self.pos)),
            Some(v) => Ok(v),
        }
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let i = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("MARK missing")?;
        let items = self.stack.split_off(i + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top_dict(&mut self) -> R<Shared<(Value, Value)>> {
        match self.stack.last() {
            Some(Value::Dict(d)) => Ok(d.clone()),
            _ => Err(format!("SETITEM(S) on a non-dict at byte {}", self.pos)),
        }
    }

    fn top_list(&mut self) -> R<Shared<Value>> {
        match self.stack.last() {
            Some(Value::List(l)) => Ok(l.clone()),
            _ => Err(format!("APPEND(S) on a non-list at byte {}", self.pos)),
        }
    }

    fn global(&mut self, module: String, name: String) -> R<()> {
        if !allowed_global(&module, &name) {
            return Err(format!(
                "the pickle references `{module}.{name}`, which torch.load would import and may run; \
                 a concept file only needs tensors, dicts, strings and numbers, so this file is not \
                 loaded (it is not a plain checkpoint, or it is malicious)"
            ));
        }
        self.stack.push(Value::Global(module, name));
        Ok(())
    }

    fn run(mut self) -> R<Value> {
        loop {
            let at = self.pos;
            let op = self.uint(1)? as u8;
            match op {
                0x80 => {
                    let proto = self.uint(1)?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                }
                0x95 => {
                    self.uint(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.uint(1)? as usize;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes at byte {at} is too large"));
                    }
                    let raw = self.uint(n)?;
                    // Two's complement of n bytes.
                    let v = if n > 0 && n < 8 && raw >> (8 * n - 1) & 1 == 1 { raw as i64 - (1i64 << (8 * n)) } else { raw as i64 };
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack.push(Value::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))));
                }
                b'X' => {
                    let n = self.uint(4)?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.uint(1)?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.uint(8)?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.top_list()?.borrow_mut().push(v);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.top_list()?.borrow_mut().extend(items);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.top_dict()?.borrow_mut().push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let p = pairs(items)?;
                    self.top_dict()?.borrow_mut().extend(p);
                }
                b'q' | b'r' | 0x94 => {
                    let id = match op {
                        b'q' => self.uint(1)?,
                        b'r' => self.uint(4)?,
                        _ => self.memo.len() as u64,
                    };
                    let top = self.stack.last().ok_or("memo of an empty stack")?.clone();
                    self.memo.insert(id, top);
                }
                b'h' | b'j' => {
                    let id = if op == b'h' { self.uint(1)? } else { self.uint(4)? };
                    let v = self.memo.get(&id).ok_or_else(|| format!("memo entry {id} missing at byte {at}"))?.clone();
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(format!("STACK_GLOBAL without string names at byte {at}"));
                    };
                    self.global(module, name)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = persistent_storage(pid)?;
                    self.stack.push(Value::Storage(s));
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(f, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    match (self.stack.last(), state) {
                        (Some(_), Value::None) => {}
                        (Some(Value::Dict(d)), Value::Dict(s)) => {
                            let add = s.borrow().clone();
                            d.borrow_mut().extend(add);
                        }
                        (_, s) => return Err(format!("BUILD with state {s} at byte {at} is not supported")),
                    }
                }
                other => {
                    return Err(format!(
                        "pickle opcode 0x{other:02x} at byte {at} is not supported by this reader \
                         (it reads tensors, dicts, lists, strings and numbers)"
                    ))
                }
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> R<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of dict items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn as_usize(v: &Value, what: &str) -> R<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!("{what} is {other}, expected a non-negative integer")),
    }
}

fn as_usizes(v: &Value, what: &str) -> R<Vec<usize>> {
    match v {
        Value::Tuple(items) => items.iter().map(|x| as_usize(x, what)).collect(),
        other => Err(format!("{what} is {other}, expected a tuple of integers")),
    }
}

/// torch's storage reference: `('storage', torch.<T>Storage, key, location, numel)`.
fn persistent_storage(pid: Value) -> R<StorageRef> {
    let Value::Tuple(t) = &pid else {
        return Err(format!("persistent id {pid} is not a storage reference"));
    };
    match t.as_slice() {
        [Value::Str(kind), Value::Global(m, ty), Value::Str(key), Value::Str(_location), numel]
            if kind == "storage" && m == "torch" =>
        {
            let dtype = storage_dtype(ty).ok_or_else(|| format!("storage type torch.{ty} is not supported"))?;
            Ok(StorageRef { dtype, type_name: ty.clone(), key: key.clone(), numel: as_usize(numel, "storage size")? })
        }
        _ => Err("persistent id is not torch's ('storage', type, key, location, numel)".into()),
    }
}

fn reduce(f: Value, args: Value) -> R<Value> {
    let Value::Global(module, name) = &f else {
        return Err(format!("REDUCE on {f}, which is not a callable"));
    };
    let Value::Tuple(args) = args else {
        return Err(format!("REDUCE of {module}.{name} without an argument tuple"));
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Rc::default())),
        ("torch._utils", "_rebuild_tensor_v2") => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            let [Value::Storage(s), offset, size, stride, ..] = args.as_slice() else {
                return Err("_rebuild_tensor_v2 arguments are not (storage, offset, size, stride, ...)".into());
            };
            let size = as_usizes(size, "tensor size")?;
            let stride = as_usizes(stride, "tensor stride")?;
            if size.len() != stride.len() {
                return Err(format!("tensor size {size:?} and stride {stride:?} differ in rank"));
            }
            Ok(Value::Tensor(TensorRef { storage: s.clone(), offset: as_usize(offset, "storage offset")?, size, stride }))
        }
        ("torch._utils", "_rebuild_parameter") => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        _ => Err(format!("calling {module}.{name} with these arguments is not supported")),
    }
}

/// A record's bytes (the zip reader verifies its CRC); `None` when there is no such record.
fn read_record(zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str) -> R<Option<Vec<u8>>> {
    use std::io::Read;
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(format!("record {name}: {e}")),
    };
    if f.compression() != zip::CompressionMethod::Stored {
        return Err(format!("record {name} is compressed ({:?}); torch.save stores records uncompressed", f.compression()));
    }
    let mut out = Vec::with_capacity(f.size().min(1 << 30) as usize);
    f.read_to_end(&mut out).map_err(|e| format!("record {name}: {e}: CRC mismatch or truncated data (corrupt file)"))?;
    Ok(Some(out))
}
