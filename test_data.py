"""Tests for data.py on tiny files in the official format (Python-2 pickles written opcode by opcode), plus the
real copy when one has been materialized (CIFAR10_DIR, or /tmp/c10):

    python /work/shared/cifar10/materialize.py /tmp/c10   # needs Pillow, only for this
    python -m pytest -q test_data.py
"""
import contextlib
import functools
import hashlib
import http.server
import io
import os
import pickle
import pickletools
import shlex
import socket
import struct
import tarfile
import threading
import time

import numpy as np
import pytest
import torch

import data
from data import DataError

N = 20  # images per tiny batch file


# ----------------------------------------------------------------------------------------------------------------
# Files in the official format, written as Python 2 wrote them

def _str(b):  # a Python 2 str: SHORT_BINSTRING or BINSTRING
    return b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<i', len(b)) + b


def _obj(v):
    if isinstance(v, bytes):
        return _str(v)
    if isinstance(v, int):
        return b'J' + struct.pack('<i', v)  # BININT
    if isinstance(v, list):
        return b'](' + b''.join(_obj(i) for i in v) + b'e'  # EMPTY_LIST MARK ... APPENDS
    if isinstance(v, np.ndarray):  # numpy.core.multiarray._reconstruct + BUILD, as numpy 1 under Python 2 wrote it
        order = b'|' if v.dtype.itemsize == 1 else b'<'
        dtype = (b'cnumpy\ndtype\n' + _str(v.dtype.str[1:].encode()) + b'K\x00K\x01\x87R'
                 b'(K\x03' + _str(order) + b'NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb')
        shape = b'(' + b''.join(_obj(s) for s in v.shape) + b't'
        return (b'cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85' + _str(b'b') + b'\x87R'
                b'(K\x01' + shape + dtype + b'\x89' + _str(np.ascontiguousarray(v).tobytes()) + b'tb')
    if isinstance(v, RawOps):
        return v.ops
    raise TypeError(type(v))


class RawOps:
    """Pickle opcodes spliced in as they are (a planted payload inside an otherwise valid dict)."""

    def __init__(self, ops):
        self.ops = ops


def py2_pickle(d):
    return b'\x80\x02}(' + b''.join(_str(k) + _obj(v) for k, v in d.items()) + b'u.'


def batch_bytes(images, labels):
    return py2_pickle({b'batch_label': b'training batch', b'labels': [int(i) for i in labels],
                       b'data': images, b'filenames': [b'img_%d.png' % i for i in range(len(labels))]})


def make_cifar(root, seed=0):
    """root/cifar-10-batches-py/ with N images per file -> {file name: (data [N, 3072], labels [N])}."""
    folder = os.path.join(root, data.FOLDER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in data.TRAIN_FILES + [data.TEST_FILE]:
        images = rng.integers(0, 256, (N, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, N)
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(batch_bytes(images, labels))
        written[name] = images, labels
    names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse', b'ship', b'truck']
    with open(os.path.join(folder, data.META_FILE), 'wb') as f:
        f.write(py2_pickle({b'num_cases_per_batch': N, b'label_names': names, b'num_vis': 3072}))
    return written


def make_tarball(src_root, path, extra=()):
    """A cifar-10-python.tar.gz of src_root/cifar-10-batches-py, then the (TarInfo, bytes) members of `extra`."""
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(os.path.join(src_root, data.FOLDER), arcname=data.FOLDER)
        for info, payload in extra:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def cifar(tmp_path):
    return tmp_path, make_cifar(tmp_path)


@pytest.fixture
def tarball(tmp_path):
    """(path, md5) of a tiny valid archive in tmp_path/src."""
    make_cifar(tmp_path / 'src')
    path = tmp_path / 'src' / data.ARCHIVE
    return path, make_tarball(tmp_path / 'src', path)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory):
    """A loopback HTTP server for `directory` in a thread, shut down on exit -> its base URL."""
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                             functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_helper_writes_python2_format():
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(batch_bytes(np.zeros((2, 3072), np.uint8), [1, 2]))]
    assert ops[0] == ('PROTO', 2)
    assert ('SHORT_BINSTRING', 'data') in ops and ('SHORT_BINSTRING', 'labels') in ops  # Python 2 str keys
    assert ('GLOBAL', 'numpy.core.multiarray _reconstruct') in ops
    assert not any(name in ('BINUNICODE', 'BINBYTES', 'SHORT_BINBYTES') for name, _ in ops)


# ----------------------------------------------------------------------------------------------------------------
# Loading

def test_load_shapes_layout_labels(cifar):
    root, written = cifar
    x_train, y_train, x_test, y_test = data.load_cifar10(root)
    assert x_train.shape == (5 * N, 3, 32, 32) and x_test.shape == (N, 3, 32, 32)
    assert x_train.dtype == x_test.dtype == torch.uint8 and y_train.dtype == y_test.dtype == torch.int64
    assert x_train.device.type == 'cpu'
    # data_batch_3, image 7, channel c, row h, column w sits at data[7, 1024 c + 32 h + w]
    images, labels = written['data_batch_3']
    for c, h, w in [(0, 0, 0), (1, 5, 17), (2, 31, 31), (2, 0, 31), (0, 31, 0)]:
        assert x_train[2 * N + 7, c, h, w] == images[7, 1024 * c + 32 * h + w]
    expect = np.concatenate([written[f][0] for f in data.TRAIN_FILES]).reshape(-1, 3, 32, 32)
    assert np.array_equal(x_train.numpy(), expect)
    assert y_train.tolist() == np.concatenate([written[f][1] for f in data.TRAIN_FILES]).tolist()
    assert np.array_equal(x_test.numpy(), written['test_batch'][0].reshape(-1, 3, 32, 32))
    assert y_test.tolist() == written['test_batch'][1].tolist()


@pytest.mark.parametrize('as_folder', [False, True])
def test_root_is_parent_or_folder(cifar, as_folder):
    root, written = cifar
    root = root / data.FOLDER if as_folder else root
    assert data.load_cifar10(root)[3].tolist() == written['test_batch'][1].tolist()
    assert data.load_class_names(str(root))[:3] == ['airplane', 'automobile', 'bird']
    assert len(data.load_class_names(root)) == 10


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r'missing .*cifar-10-batches-py: pass download=True, or download .* by hand.*--data DIR'):
        data.load_cifar10(tmp_path)


@pytest.mark.parametrize('name', ['data_batch_3', 'test_batch', 'batches.meta'])
def test_missing_file(cifar, name):
    root, _ = cifar
    os.remove(root / data.FOLDER / name)
    with pytest.raises(DataError, match=rf'missing .*{name}.*--data DIR'):
        data.load_cifar10(root)


@pytest.mark.parametrize('keep', [0, 10, 0.5])
def test_truncated_file(cifar, keep):
    root, _ = cifar
    path = root / data.FOLDER / 'data_batch_4'
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DataError, match=r'data_batch_4.*truncated or corrupt'):
        data.load_cifar10(root)


ZEROS = np.zeros((N, 3072), np.uint8)  # a valid batch's data and labels
LABELS = [0] * N


@pytest.mark.parametrize('content, why', [
    pytest.param(batch_bytes(np.zeros((N, 3071), np.uint8), LABELS), r'expected uint8 \[n, 3072\]', id='shape'),
    pytest.param(batch_bytes(np.zeros((N, 3072), np.uint16), LABELS), r'uint16', id='uint16'),
    pytest.param(batch_bytes(np.zeros((N, 3072), np.float32), LABELS), r'float32', id='float32'),
    pytest.param(batch_bytes(ZEROS, [10] + LABELS[1:]), r'labels span 0..10', id='label-10'),
    pytest.param(batch_bytes(ZEROS, [-1] + LABELS[1:]), r'labels span -1..0', id='label-minus-1'),
    pytest.param(batch_bytes(ZEROS, LABELS[1:]), r'19 labels for 20 images', id='label-count'),
    pytest.param(py2_pickle({b'data': ZEROS, b'labels': [b'cat'] * N}), r'expected a list of ints', id='label-str'),
    pytest.param(py2_pickle({b'data': ZEROS}), r"lack 'data' or 'labels'", id='no-labels'),
    pytest.param(b'\x80\x02](K\x01e.', r'holds a list, not a dict', id='not-a-dict'),
])
def test_bad_content(cifar, content, why):
    root, _ = cifar
    (root / data.FOLDER / 'data_batch_2').write_bytes(content)
    with pytest.raises(DataError, match=rf'data_batch_2.*{why}'):
        data.load_cifar10(root)


@pytest.mark.parametrize('how', ['os.system', 'open', 'nested'])
def test_malicious_pickle_runs_nothing(cifar, how):
    root, _ = cifar
    marker = root / 'pwned'
    system, write = (os.system, ('touch ' + shlex.quote(str(marker)),)), (open, (str(marker), 'w'))

    class Payload:
        def __reduce__(self):
            return write if how == 'open' else system
    evil = pickle.dumps(Payload(), protocol=2)
    live = pickle.loads(evil)  # the payload is live: plain pickle runs it
    if hasattr(live, 'close'):
        live.close()
    assert marker.exists()
    marker.unlink()
    if how == 'nested':  # hidden inside an otherwise valid batch
        evil = py2_pickle({b'data': ZEROS, b'labels': RawOps(evil[2:-1])})
    (root / data.FOLDER / 'data_batch_1').write_bytes(evil)
    with pytest.raises(DataError, match=r'refusing to unpickle (posix\.system|io\.open) in .*data_batch_1'):
        data.load_cifar10(root)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Download, md5, extraction

def assert_only(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names)  # no temp files, no partial folders


def test_download_file_url(tarball, tmp_path, capsys):
    path, md5 = tarball
    dest = tmp_path / 'dest'
    folder = data.download_cifar10(dest, url=path.as_uri(), md5=md5)
    assert folder == str(dest / data.FOLDER)
    assert_only(dest, [data.FOLDER, data.ARCHIVE])
    assert data.load_cifar10(dest)[0].shape == (5 * N, 3, 32, 32)
    assert 'MB' in capsys.readouterr().err  # the progress bar
    assert data.download_cifar10(dest, url='http://unused.invalid/', md5=md5) == folder  # already there
    # a verified archive is extracted again without fetching anything
    os.rename(dest / data.FOLDER, tmp_path / 'moved')
    assert data.download_cifar10(dest, url='http://unused.invalid/', md5=md5) == folder
    assert_only(dest, [data.FOLDER, data.ARCHIVE])


def test_download_http_and_load(tarball, tmp_path, monkeypatch):
    path, md5 = tarball
    dest = tmp_path / 'dest'
    with serve(path.parent) as base:
        with pytest.raises(DataError, match=r'could not download .*404.*by hand.*--data DIR'):
            data.download_cifar10(dest, url=f'{base}/nope.tar.gz', md5=md5)
        assert_only(dest, [])
        real = data.download_cifar10
        monkeypatch.setattr(data, 'download_cifar10', lambda root: real(root, url=f'{base}/{path.name}', md5=md5))
        x_train, y_train, x_test, y_test = data.load_cifar10(dest, download=True)
    assert x_test.shape == (N, 3, 32, 32)
    assert_only(dest, [data.FOLDER, data.ARCHIVE])


def test_download_md5_mismatch(tarball, tmp_path):
    path, md5 = tarball
    dest = tmp_path / 'dest'
    with pytest.raises(DataError, match=rf'md5 mismatch .*expected 0{{32}}, got {md5}'):
        data.download_cifar10(dest, url=path.as_uri(), md5='0' * 32)
    assert_only(dest, [])


def test_download_failure_says_what_to_do(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    for url in [f'http://127.0.0.1:{port}/c.tar.gz', (tmp_path / 'absent.tar.gz').as_uri(), 'ftp://127.0.0.1/x']:
        with pytest.raises(DataError, match=r'could not download .*by hand.*--data DIR'):
            data.download_cifar10(tmp_path / 'dest', url=url, md5=data.MD5)
        assert_only(tmp_path / 'dest', [])


def test_corrupt_archive(tmp_path):
    bad = tmp_path / 'bad.tar.gz'
    bad.write_bytes(b'not a gzip file' * 100)
    with pytest.raises(DataError, match=r'cannot extract'):
        data.download_cifar10(tmp_path / 'dest', url=bad.as_uri(), md5=hashlib.md5(bad.read_bytes()).hexdigest())
    assert_only(tmp_path / 'dest', [data.ARCHIVE])


def _member(name, kind=tarfile.REGTYPE, link=''):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize('make', [
    pytest.param(lambda t: _member(str(t / 'abs_evil')), id='absolute'),
    pytest.param(lambda t: _member('../evil'), id='dotdot'),
    pytest.param(lambda t: _member('cifar-10-batches-py/../../evil'), id='inner-dotdot'),
    pytest.param(lambda t: _member('evil'), id='outside-folder'),
    pytest.param(lambda t: _member('cifar-10-batches-py/link', tarfile.SYMTYPE, '/etc/passwd'), id='symlink'),
    pytest.param(lambda t: _member('cifar-10-batches-py/hard', tarfile.LNKTYPE, '/etc/passwd'), id='hardlink'),
    pytest.param(lambda t: _member('cifar-10-batches-py/dev', tarfile.CHRTYPE), id='device'),
])
def test_unsafe_member_rejected_before_extracting(tmp_path, make):
    make_cifar(tmp_path / 'src')
    info = make(tmp_path)
    path = tmp_path / 'src' / data.ARCHIVE
    md5 = make_tarball(tmp_path / 'src', path, extra=[(info, b'' if info.islnk() or info.issym() else b'x')])
    dest = tmp_path / 'a' / 'dest'  # '../../evil' from here would land in tmp_path
    with pytest.raises(DataError, match=rf'unsafe member {info.name!r}.*nothing was extracted'):
        data.download_cifar10(dest, url=path.as_uri(), md5=md5)
    assert_only(dest, [data.ARCHIVE])  # the valid files before the bad member were not written either
    assert not any(p.name in ('evil', 'abs_evil') for p in tmp_path.rglob('*'))


# ----------------------------------------------------------------------------------------------------------------
# Holding out and batching

def test_split_train_val():
    x, y = torch.arange(10), torch.arange(10) + 100
    x_tr, y_tr, x_val, y_val = data.split_train_val(x, y, val=3)
    assert x_tr.tolist() == list(range(7)) and x_val.tolist() == [7, 8, 9] and y_val.tolist() == [107, 108, 109]
    x_tr, y_tr, x_val2, _ = data.split_train_val(x, y, val=3, limit=4)
    assert x_tr.tolist() == [0, 1, 2, 3] and y_tr.tolist() == [100, 101, 102, 103]
    assert torch.equal(x_val, x_val2)  # the validation slice does not move with limit
    x_tr, _, x_val, _ = data.split_train_val(x, y, val=0, limit=10)
    assert len(x_tr) == 10 and len(x_val) == 0
    for kwargs, flag in [({'val': 10}, '--val'), ({'val': -1}, '--val'), ({'val': 3, 'limit': 0}, '--limit'),
                         ({'val': 3, 'limit': 8}, '--limit')]:
        with pytest.raises(DataError, match=flag):
            data.split_train_val(x, y, **kwargs)


def tiny_set(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n)


def test_batches_in_order_and_drop_last():
    x, y = tiny_set()
    out = list(data.batches(x, y, 16))
    assert [len(yb) for _, yb in out] == [16, 16, 16, 2]
    xb = torch.cat([xb for xb, _ in out])
    assert xb.dtype == torch.float32 and xb.shape == (50, 3, 32, 32) and xb.device == x.device
    assert 0 <= xb.min() and xb.max() <= 1
    assert torch.equal(xb, x.float() / 255) and torch.cat([yb for _, yb in out]).tolist() == list(range(50))
    assert [len(yb) for _, yb in data.batches(x, y, 16, drop_last=True)] == [16, 16, 16]
    assert [len(yb) for _, yb in data.batches(x, y, 25, drop_last=True)] == [25, 25]
    with pytest.raises(ValueError):
        next(data.batches(x.float(), y, 16))


def test_batches_shuffle_is_seeded():
    x, y = tiny_set()
    def run(seed, augment=False):
        return [(xb, yb) for xb, yb in data.batches(x, y, 16, shuffle_seed=seed, augment=augment)]
    a = run(7)
    ys = torch.cat([yb for _, yb in a])
    assert sorted(ys.tolist()) == list(range(50)) and ys.tolist() != list(range(50))  # a permutation
    assert all(torch.equal(xb, x[yb].float() / 255) for xb, yb in a)  # images stay with their labels
    for augment in (False, True):
        first, again, other = run(7, augment), run(7, augment), run(8, augment)
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, again))
        assert not all(torch.equal(p[1], q[1]) for p, q in zip(first, other))


def _reference_views(img, pad=4):
    """Every crop of the zero-padded image, flipped or not, one example at a time -> {(top, left, flip): view}."""
    C, H, W = img.shape
    padded = torch.zeros(C, H + 2 * pad, W + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + H, pad:pad + W] = img
    views = {}
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[:, top:top + H, left:left + W]
            views[top, left, False], views[top, left, True] = crop, crop.flip(-1)
    return views


def test_augment_is_a_shifted_flipped_copy():
    x, y = tiny_set(128, seed=1)
    xb, yb = next(data.batches(x, y, 128, shuffle_seed=3, augment=True))
    assert xb.shape == (128, 3, 32, 32) and xb.dtype == torch.float32
    seen = []
    for img, i in zip((xb * 255).round().to(torch.uint8), yb):
        views = _reference_views(x[i])
        keys, stack = list(views), torch.stack(list(views.values()))  # (162, 3, 32, 32)
        match = (stack == img).flatten(1).all(1).nonzero().flatten().tolist()
        assert len(match) == 1, f'augmented image {i} is no padded crop/flip of the original'
        seen.append(keys[match[0]])
    tops, lefts, flips = zip(*seen)
    assert set(tops) == set(lefts) == set(range(9))  # every offset occurs, uniformly drawn
    assert 0.35 < sum(flips) / len(flips) < 0.65  # p = 0.5


# ----------------------------------------------------------------------------------------------------------------
# The real copy, when it has been materialized

REAL = os.environ.get('CIFAR10_DIR', '/tmp/c10')


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f'no CIFAR-10 copy at {REAL} (set CIFAR10_DIR)')
def test_real_copy():
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = data.load_cifar10(REAL)
    seconds = time.perf_counter() - start
    assert x_train.shape == (50000, 3, 32, 32) and x_test.shape == (10000, 3, 32, 32)
    assert torch.bincount(y_train).tolist() == [5000] * 10 and torch.bincount(y_test).tolist() == [1000] * 10
    assert data.load_class_names(REAL) == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                                           'ship', 'truck']
    # channels in R, G, B order: CIFAR-10's well-known means (0.491, 0.482, 0.447)
    mean = x_train.sum(dim=(0, 2, 3)).double() / (50000 * 1024 * 255)
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=0.01)
    assert seconds < 10, f'load_cifar10 took {seconds:.1f} s'
