"""CIFAR-10 and -100 for ANCHOR: read the official python files, download them safely, batch and augment on the device.

    from data import DATASETS, load_dataset, split_train_val, batches
    x_train, y_train, x_test, y_test = load_dataset('cifar10', 'data', download=True)  # uint8 [N,3,32,32], int64 [N]
    x_tr, y_tr, x_val, y_val = split_train_val(x_train, y_train, val=5000)    # last 5000 train images held out
    x_tr, y_tr = x_tr.to('cuda'), y_tr.to('cuda')                             # the whole set fits on the GPU (150 MB)
    for xb, yb in batches(x_tr, y_tr, 512, shuffle_seed=seed * 1000 + epoch, augment=True, drop_last=True):
        ...                                                                   # xb float32 [512,3,32,32] in [0, 1]

DATASETS describes each data set once ('cifar10', 'cifar100': files, URL, md5, num_classes, mean/std); one code path
serves both, and load_cifar10/load_cifar100 are load_dataset by name. CIFAR-100's labels are the 100 fine ones.
`root` holds the data set's folder (cifar-10-batches-py/, cifar-100-python/, side by side if both) or is that folder,
known by its name or its files (any CIFAR-10 batch name; all three of CIFAR-100's generic train, test, meta). The
files are Python-2 pickles, read with an unpickler that builds numpy arrays and nothing else, because unpickling
an arbitrary file runs arbitrary code. Every problem with the files raises DataError, whose one-line message
names the file and the fix. No DataLoader: batches are gathered, cropped and flipped on the device, whole batch
at a time (airbench's approach). Measured on a 2-core CPU box: load_cifar10 reads the full set in ~1 s.
"""
import collections
import hashlib
import http.client
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F

try:
    from numpy._core import multiarray as _multiarray  # numpy >= 1.26
except ImportError:  # pragma: no cover - older numpy
    from numpy.core import multiarray as _multiarray

# One description per data set. marks: how many of its file names make a folder with another name count as its
# folder (CIFAR-10's names are distinctive; CIFAR-100's train/test/meta are not, so it takes all three).
Dataset = collections.namedtuple('Dataset', 'name title folder archive url md5 train_files test_file meta_file '
                                            'label_key names_key num_classes marks mean std')
DATASETS = {
    'cifar10': Dataset(
        name='cifar10', title='CIFAR-10', folder='cifar-10-batches-py', archive='cifar-10-python.tar.gz',
        url='https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz', md5='c58f30108f718f92721af3b95e74349a',
        train_files=tuple(f'data_batch_{i}' for i in range(1, 6)), test_file='test_batch', meta_file='batches.meta',
        label_key='labels', names_key='label_names', num_classes=10, marks=1,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    'cifar100': Dataset(  # coarse_labels (20 superclasses) are there too, and ignored
        name='cifar100', title='CIFAR-100', folder='cifar-100-python', archive='cifar-100-python.tar.gz',
        url='https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz', md5='eb9058c3a382ffc7106e4002c42a8d85',
        train_files=('train',), test_file='test', meta_file='meta',
        label_key='fine_labels', names_key='fine_label_names', num_classes=100, marks=3,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}
_C10, _C100 = DATASETS['cifar10'], DATASETS['cifar100']
URL, MD5, FOLDER, ARCHIVE = _C10.url, _C10.md5, _C10.folder, _C10.archive  # CIFAR-10's, by their older names
TRAIN_FILES, TEST_FILE, META_FILE = list(_C10.train_files), _C10.test_file, _C10.meta_file
NUM_CLASSES = _C10.num_classes
URL100, MD5_100 = _C100.url, _C100.md5


class DataError(Exception):
    """Any problem with the CIFAR files, the download or the archive; the message names the file and the fix."""


def _dataset(name):
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: use one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _files(ds):
    return [*ds.train_files, ds.test_file, ds.meta_file]


def _where(ds):  # how to name the data folder, for command-line and library users alike
    return f"--data DIR on the command line, root in load_{ds.name}(root)"


def _by_hand(ds):
    return (f"download {ds.archive} by hand from {ds.url}, extract it, and pass the folder holding {ds.folder}/ "
            f"({_where(ds)})")


# ----------------------------------------------------------------------------------------------------------------
# Reading the official files

# All that the unpickler will build: numpy arrays, which is all the official files hold. Names map to objects
# here (rather than importing the module a file names), which also keeps numpy 2 quiet about numpy.core.
_SAFE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _multiarray._reconstruct,  # as Python 2 + numpy 1 wrote it
    ('numpy._core.multiarray', '_reconstruct'): _multiarray._reconstruct,  # numpy 2's name for it
    ('numpy.core.multiarray', 'scalar'): _multiarray.scalar,  # numpy scalars, should labels be stored as such
    ('numpy._core.multiarray', 'scalar'): _multiarray.scalar,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global but numpy's array reconstruction, so a planted file cannot call os.system & co."""

    def __init__(self, file, path, ds):
        super().__init__(file, encoding='latin1')  # Python-2 str -> str; numpy accepts latin1 array bytes
        self.path, self.ds = path, ds

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(f"refusing to unpickle {module}.{name} in {self.path}: not a {self.ds.title} file; "
                            f"delete it and {_by_hand(self.ds)}")
        return _SAFE_GLOBALS[module, name]


def _unpickle(path, ds):
    """Read one file of ds into a dict with str keys; a truncated or foreign file raises DataError."""
    try:
        with open(path, 'rb') as f:
            d = _CifarUnpickler(f, path, ds).load()
    except DataError:
        raise
    except Exception as e:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}): the file is truncated or corrupt; "
                        f"delete {ds.folder}/ and download again, or {_by_hand(ds)}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, not a dict: not a {ds.title} file; {_by_hand(ds)}")
    return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in d.items()}  # bytes keys too


def _bad(path, what, ds):
    return DataError(f"{path}: {what}; not an intact {ds.title} file; delete it and {_by_hand(ds)}")


def _load_batch(path, ds):
    """One file of images -> (data uint8 [n, 3072], labels int64 [n]), checked."""
    d, key = _unpickle(path, ds), ds.label_key
    if 'data' not in d or key not in d:
        raise _bad(path, f"keys {list(d)} lack 'data' or '{key}'", ds)
    data = d['data']
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise _bad(path, f"'data' is {type(data).__name__} {getattr(data, 'dtype', '')} "
                         f"{list(getattr(data, 'shape', []))}, expected uint8 [n, 3072]", ds)
    labels = np.asarray(d[key])
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in 'iu'):
        raise _bad(path, f"'{key}' is {labels.dtype} {list(labels.shape)}, expected a list of ints", ds)
    if len(labels) != len(data):
        raise _bad(path, f"{len(labels)} labels for {len(data)} images", ds)
    if labels.size and (labels.min() < 0 or labels.max() >= ds.num_classes):
        raise _bad(path, f"labels span {labels.min()}..{labels.max()}, expected 0..{ds.num_classes - 1}", ds)
    return data, labels.astype(np.int64)


def _is_folder(path, ds):
    """Whether path is ds's folder: by its name, or by holding ds.marks of its file names."""
    return (os.path.basename(os.path.normpath(path)) == ds.folder
            or sum(os.path.isfile(os.path.join(path, f)) for f in _files(ds)) >= ds.marks)


def _folder(root, ds, download=False):
    """ds's folder: root/<ds.folder>, or root itself if it is that folder; says so when root has the other set."""
    root = os.fspath(root)
    if os.path.isdir(os.path.join(root, ds.folder)):
        return os.path.join(root, ds.folder)
    if _is_folder(root, ds):
        return root
    held = None  # the other data set when root holds its folder: the two may live side by side in one root
    for o in DATASETS.values():
        if o is not ds and _is_folder(root, o):  # root IS the other's folder: a download would nest ours in it
            raise DataError(f"{root} is the {o.title} folder, not {ds.title}: pass --dataset {o.name}, or pass "
                            f"--data the folder above it (download=True fetches {ds.folder}/ there)")
        if o is not ds and os.path.isdir(os.path.join(root, o.folder)):
            held = (f"{root} holds {o.title} ({o.folder}/), not {ds.title}: pass --dataset {o.name}, "
                    f"or put {ds.folder}/ there")
    if not download:
        raise DataError(f"{held} (download=True fetches it)" if held else
                        f"no {ds.folder}/ in {os.path.abspath(root)} (nor its files): pass the folder holding "
                        f"{ds.folder}/ ({_where(ds)}), or download=True to fetch it there, or download {ds.archive} "
                        f"by hand from {ds.url} and extract it there")
    try:
        return _download(ds, root, ds.url, ds.md5)
    except DataError as e:
        if not held:
            raise
        raise DataError(f"{e}; note that {held}") from None


def _path(folder, name, ds):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise DataError(f"missing {path}: {ds.folder}/ is incomplete; delete it and download again "
                        f"(download=True), or {_by_hand(ds)}")
    return path


def _stack(paths, ds):
    """Files -> (x uint8 [N, 3, 32, 32], y int64 [N]) CPU tensors; one copy, no per-image work."""
    data, labels = zip(*[_load_batch(p, ds) for p in paths])
    x = np.concatenate(data).reshape(-1, 3, 32, 32)  # rows are 1024 R, 1024 G, 1024 B, each 32x32 row-major
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(labels))


def load_dataset(name, root, download=False):
    """-> x_train uint8 [50000,3,32,32], y_train int64 [50000], x_test uint8 [10000,3,32,32], y_test int64 [10000].

    name is a key of DATASETS ('cifar10', 'cifar100'). CPU tensors, labels 0..num_classes-1. Downloads the
    archive first if download=True and root holds no folder of that data set.
    """
    ds = _dataset(name)
    folder = _folder(root, ds, download)
    paths = {f: _path(folder, f, ds) for f in _files(ds)}  # all there, first
    x_train, y_train = _stack([paths[f] for f in ds.train_files], ds)
    x_test, y_test = _stack([paths[ds.test_file]], ds)
    return x_train, y_train, x_test, y_test


def load_cifar10(root, download=False):  # labels 0..9
    return load_dataset('cifar10', root, download)


def load_cifar100(root, download=False):  # the fine labels 0..99
    return load_dataset('cifar100', root, download)


def load_class_names(root, dataset='cifar10'):
    """-> the class names from the meta file: ['airplane', ..., 'truck'], or CIFAR-100's ['apple', ..., 'worm']."""
    ds = _dataset(dataset)
    path = _path(_folder(root, ds), ds.meta_file, ds)
    names = _unpickle(path, ds).get(ds.names_key)
    if not (isinstance(names, list) and len(names) == ds.num_classes and all(isinstance(n, str) for n in names)):
        raise _bad(path, f"'{ds.names_key}' is {names!r:.80}, expected a list of {ds.num_classes} str", ds)
    return names


# ----------------------------------------------------------------------------------------------------------------
# Download, md5 and safe extraction

def _progress(done, total, width=30):
    """A one-line bar on stderr, redrawn in place: [#####.....]  45.2/162.6 MB."""
    mb = 1 << 20
    if total:
        k = width * done // total
        sys.stderr.write(f"\r[{'#' * k}{'.' * (width - k)}] {done / mb:6.1f}/{total / mb:.1f} MB")
    else:  # no Content-Length
        sys.stderr.write(f"\r{done / mb:6.1f} MB")
    sys.stderr.flush()


def _fetch(url, dest, md5, ds, timeout=60):
    """Stream url into a temporary file beside dest; rename it to dest only once the md5 matches."""
    if urllib.parse.urlparse(url).scheme not in ('http', 'https', 'file'):
        raise DataError(f"could not download {url}: only http, https and file URLs are fetched; {_by_hand(ds)}")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f'.{ds.archive}.', suffix='.part')
    digest, done = hashlib.md5(), 0
    try:
        sys.stderr.write(f"downloading {url}\n")
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get('Content-Length') or 0)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                _progress(done, total)
        if digest.hexdigest() != md5:
            raise DataError(f"md5 mismatch for {url}: expected {md5}, got {digest.hexdigest()}; the download is "
                            f"corrupt or not {ds.archive} and was deleted; try again, or {_by_hand(ds)}")
        os.replace(tmp, dest)  # atomic: dest is either absent or complete and verified
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, resets, a full disk
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # it holds the open response
        reason = e.reason if type(e) is urllib.error.URLError else e  # HTTPError's str holds the status code
        raise DataError(f"could not download {url}: {reason}; {_by_hand(ds)}") from None
    finally:
        if done:
            sys.stderr.write('\n')  # end the progress line
        if os.path.exists(tmp):  # a partial or bad download is never left behind
            os.remove(tmp)


def _md5(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'md5').hexdigest()


def _check_member(member, archive, ds):
    """Only regular files and folders inside ds's folder: no absolute paths, '..', links or devices."""
    parts = member.name.split('/')
    if member.name.startswith('/') or '..' in parts:
        why = 'its path escapes the target folder'
    elif parts[0] != ds.folder:
        why = f'it lies outside {ds.folder}/'
    elif not (member.isfile() or member.isdir()):
        why = 'it is a link or a device, not a regular file'
    else:
        return
    raise DataError(f"unsafe member {member.name!r} in {archive}: {why}; nothing was extracted. "
                    f"This is not {ds.archive}: delete it and {_by_hand(ds)}")


def _extract(archive, root, ds):
    """Check every member, extract into a temporary folder in root, then rename it into place."""
    try:
        with tarfile.open(archive, 'r:gz') as tar:
            members = tar.getmembers()
            for m in members:  # all checks before the first byte is written
                _check_member(m, archive, ds)
            tmp = tempfile.mkdtemp(dir=root, prefix=f'.{ds.folder}.')
            try:
                for m in members:  # write the bytes ourselves: no owners, modes or links from the archive
                    path = os.path.join(tmp, *m.name.split('/'))
                    os.makedirs(path if m.isdir() else os.path.dirname(path), exist_ok=True)
                    if m.isfile():
                        with tar.extractfile(m) as src, open(path, 'wb') as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                if not os.path.isdir(os.path.join(tmp, ds.folder)):
                    raise DataError(f"{archive} holds no {ds.folder}/: not {ds.archive}; delete it and "
                                    f"{_by_hand(ds)}")
                os.rename(os.path.join(tmp, ds.folder), os.path.join(root, ds.folder))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as e:  # zlib.error is caught by tarfile as ReadError
        raise DataError(f"cannot extract {archive} ({type(e).__name__}: {e}): delete it and {_by_hand(ds)}") from None
    return os.path.join(root, ds.folder)


def _download(ds, root, url, md5):
    """-> root/<ds.folder>: as it is if there (delete it to redo), else fetched, md5-checked, safely extracted."""
    root = os.fspath(root)
    folder, archive = os.path.join(root, ds.folder), os.path.join(root, ds.archive)
    if os.path.isdir(folder):
        return folder
    created, parent = [], os.path.abspath(root)  # the folders made here, deepest first
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(root, exist_ok=True)
    try:
        if not (os.path.isfile(archive) and _md5(archive) == md5):  # else: verified by an earlier call
            _fetch(url, archive, md5, ds)
        return _extract(archive, root, ds)
    except BaseException:  # a failed download leaves no empty ./data/ behind; a kept archive keeps its folder
        for path in created:
            if os.listdir(path):
                break
            os.rmdir(path)
        raise


def download_cifar10(root, url=URL, md5=MD5):  # -> root/cifar-10-batches-py; url: http(s) or file
    return _download(_C10, root, url, md5)


def download_cifar100(root, url=URL100, md5=MD5_100):  # -> root/cifar-100-python
    return _download(_C100, root, url, md5)


# ----------------------------------------------------------------------------------------------------------------
# Holding out and batching

def split_train_val(x, y, val, limit=None):
    """-> x_tr, y_tr, x_val, y_val: the last `val` images are validation; then the first `limit` of the rest train.

    The validation slice depends on nothing but `val`, so runs with different --limit or --seed compare on it.
    Raises DataError (one line for the CLI) if val or limit does not fit.
    """
    n = len(x)
    if len(y) != n:
        raise DataError(f"{n} images but {len(y)} labels")
    if not 0 <= val < n:
        raise DataError(f"--val {val} does not fit {n} training images: use 0 <= val < {n}")
    rest = n - val
    if limit is not None and not 0 < limit <= rest:
        raise DataError(f"--limit {limit} does not fit the {rest} training images left after --val {val}: "
                         f"use 1 <= limit <= {rest}")
    return x[:rest][:limit], y[:rest][:limit], x[rest:], y[rest:]


def _augment(x, generator, pad=4):
    """Per-example random crop with zero padding + horizontal flip, whole batch in one gather.

    x: uint8 [B, C, H, W] -> same shape; like torchvision RandomCrop(H, padding=pad) + RandomHorizontalFlip().
    """
    B, C, H, W = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros around
    top, left = torch.randint(0, 2 * pad + 1, (2, B), generator=generator, device=dev)  # crop corners, (B,)
    flip = torch.randint(0, 2, (B,), generator=generator, device=dev).bool()  # (B,)
    rows = top[:, None] + torch.arange(H, device=dev)  # (B, H) source row of each output row
    cols = left[:, None] + torch.arange(W, device=dev)  # (B, W) source column of each output column
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping the crop = reading its columns backwards
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def batches(x, y, batch_size, shuffle_seed=None, augment=False, drop_last=False, second_view=False):
    """Yield (xb float32 [B,3,32,32] in [0, 1], yb int64 [B]) from uint8 x [N,3,32,32] and y [N], on x.device.

    shuffle_seed=None keeps the order; an int shuffles with a generator seeded by it, which also draws the
    crops and flips, so one seed (e.g. seed * 1000 + epoch) reproduces an epoch exactly, on resume too.
    augment=True without a seed draws from torch's global generator. second_view=True (with augment) yields
    (xb, yb, xb2): xb2 another, independent augmentation of the same images, drawn from a generator of its own,
    so that xb and the order are those of the same call without it.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or len(x) != len(y) or x.device != y.device:
        raise ValueError(f"expected uint8 x [N, C, H, W] and y [N] on one device, got {x.dtype} {list(x.shape)} "
                         f"on {x.device} and {list(y.shape)} on {y.device}")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    if second_view and (not augment or shuffle_seed is None):
        raise ValueError("second_view needs augment=True and a shuffle_seed (its generator is seeded from it)")
    n = len(x)
    generator = second = order = None
    if shuffle_seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(shuffle_seed)
        order = torch.randperm(n, generator=generator, device=x.device)
        second = torch.Generator(device=x.device).manual_seed(shuffle_seed + 2 ** 40)  # a stream of its own
    for start in range(0, n, batch_size):
        if drop_last and start + batch_size > n:
            break
        idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        xb, yb = x[idx], y[idx]  # gather uint8: a quarter of the bytes of float
        if second_view:
            yield _augment(xb, generator).float().div_(255), yb, _augment(xb, second).float().div_(255)
            continue
        if augment:
            xb = _augment(xb, generator)
        yield xb.float().div_(255), yb
