"""Tests for data.py on tiny files in the official format (Python-2 pickles written opcode by opcode), CIFAR-10's
and CIFAR-100's (most tests run once per data set, through the `ds` fixture), plus the real CIFAR-10 copy when
one has been materialized (CIFAR10_DIR, or /tmp/c10):

    python /work/shared/cifar10/materialize.py /tmp/c10   # needs Pillow, only for this
    python -m pytest -q test_data.py
"""
import contextlib
import functools
import hashlib
import http.server
import inspect
import io
import os
import pickle
import pickletools
import re
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


def coarse(fine):  # CIFAR-100's 20 superclasses; any map that differs from the fine labels will do
    return [int(i) // 5 for i in fine]


def batch_bytes(images, labels, dataset='cifar10'):
    """A batch file as Python 2 wrote it: CIFAR-10's 'labels', or CIFAR-100's 'fine_labels' + 'coarse_labels'."""
    labels = [int(i) for i in labels]
    keyed = {b'labels': labels} if dataset == 'cifar10' else {b'fine_labels': labels, b'coarse_labels': coarse(labels)}
    return py2_pickle({b'batch_label': b'training batch', **keyed,
                       b'data': images, b'filenames': [b'img_%d.png' % i for i in range(len(labels))]})


CIFAR100_NAMES = [b'apple', b'aquarium_fish', b'baby'] + [b'class_%d' % i for i in range(3, 100)]


def meta_bytes(dataset='cifar10'):
    if dataset == 'cifar10':
        names = [b'airplane', b'automobile', b'bird', b'cat', b'deer', b'dog', b'frog', b'horse', b'ship', b'truck']
        return py2_pickle({b'num_cases_per_batch': N, b'label_names': names, b'num_vis': 3072})
    coarse_names = [b'superclass_%d' % i for i in range(20)]
    return py2_pickle({b'fine_label_names': CIFAR100_NAMES, b'coarse_label_names': coarse_names})


def make_cifar(root, seed=0, dataset='cifar10'):
    """root/<the data set's folder>/ with 5 N training and N test images -> {file name: (data [n, 3072], labels [n])}.

    CIFAR-10 has N images in each of its 5 training batches, CIFAR-100 all 5 N in its one `train` file; CIFAR-100's
    labels are the fine ones, and its training labels include 0 and 99.
    """
    ds = data.DATASETS[dataset]
    folder = os.path.join(root, ds.folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in ds.train_files + (ds.test_file,):
        n = 5 * N // len(ds.train_files) if name in ds.train_files else N
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, ds.num_classes, n)
        if name == ds.train_files[0]:
            labels[:2] = 0, ds.num_classes - 1  # the whole range
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(batch_bytes(images, labels, dataset))
        written[name] = images, labels
    with open(os.path.join(folder, ds.meta_file), 'wb') as f:
        f.write(meta_bytes(dataset))
    return written


def make_tarball(src_root, path, extra=(), dataset='cifar10'):
    """The data set's .tar.gz of its folder in src_root, then the (TarInfo, bytes) members of `extra`."""
    folder = data.DATASETS[dataset].folder
    with tarfile.open(path, 'w:gz') as tar:
        tar.add(os.path.join(src_root, folder), arcname=folder)
        for info, payload in extra:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(params=['cifar10', 'cifar100'])
def ds(request):
    """The data set a test runs on: each test that asks for it (or for cifar, tarball) runs once per data set."""
    return data.DATASETS[request.param]


def load(ds, root, download=False):  # load_cifar10 or load_cifar100, the public names
    return getattr(data, f'load_{ds.name}')(root, download=download)


def download(ds, root, **kwargs):  # download_cifar10 or download_cifar100
    return getattr(data, f'download_{ds.name}')(root, **kwargs)


@pytest.fixture
def cifar(tmp_path, ds):
    return tmp_path, make_cifar(tmp_path, dataset=ds.name)


@pytest.fixture
def tarball(tmp_path, ds):
    """(path, md5) of a tiny valid archive of ds in tmp_path/src."""
    make_cifar(tmp_path / 'src', dataset=ds.name)
    path = tmp_path / 'src' / ds.archive
    return path, make_tarball(tmp_path / 'src', path, dataset=ds.name)


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


@pytest.mark.parametrize('dataset, key', [('cifar10', 'labels'), ('cifar100', 'fine_labels')])
def test_helper_writes_python2_format(dataset, key):
    blob = batch_bytes(np.zeros((2, 3072), np.uint8), [1, 2], dataset)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(blob)]
    assert ops[0] == ('PROTO', 2)
    assert ('SHORT_BINSTRING', 'data') in ops and ('SHORT_BINSTRING', key) in ops  # Python 2 str keys
    assert ('GLOBAL', 'numpy.core.multiarray _reconstruct') in ops
    assert not any(name in ('BINUNICODE', 'BINBYTES', 'SHORT_BINBYTES') for name, _ in ops)


# ----------------------------------------------------------------------------------------------------------------
# Loading

def test_load_shapes_layout_labels(cifar, ds):
    root, written = cifar
    x_train, y_train, x_test, y_test = load(ds, root)
    assert x_train.shape == (5 * N, 3, 32, 32) and x_test.shape == (N, 3, 32, 32)
    assert x_train.dtype == x_test.dtype == torch.uint8 and y_train.dtype == y_test.dtype == torch.int64
    assert x_train.device.type == 'cpu'
    # the last training file, image 7, channel c, row h, column w sits at data[7, 1024 c + 32 h + w]
    images, labels = written[ds.train_files[-1]]
    for c, h, w in [(0, 0, 0), (1, 5, 17), (2, 31, 31), (2, 0, 31), (0, 31, 0)]:
        assert x_train[5 * N - len(images) + 7, c, h, w] == images[7, 1024 * c + 32 * h + w]
    expect = np.concatenate([written[f][0] for f in ds.train_files]).reshape(-1, 3, 32, 32)
    assert np.array_equal(x_train.numpy(), expect)
    assert y_train.tolist() == np.concatenate([written[f][1] for f in ds.train_files]).tolist()
    assert np.array_equal(x_test.numpy(), written[ds.test_file][0].reshape(-1, 3, 32, 32))
    assert y_test.tolist() == written[ds.test_file][1].tolist()
    assert y_train.min() == 0 and y_train.max() == ds.num_classes - 1
    if ds.name == 'cifar100':  # the fine labels, not the coarse ones written beside them
        assert y_train.tolist() != coarse(y_train.tolist())
    assert data.load_dataset(ds.name, root)[3].tolist() == y_test.tolist()  # the generic entry point


def test_datasets_table():
    c10, c100 = data.DATASETS['cifar10'], data.DATASETS['cifar100']
    assert (c10.num_classes, c10.mean, c10.std) == (10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert (c100.num_classes, c100.mean, c100.std) == (100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    for fn, url, md5 in [(data.download_cifar10, 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
                          'c58f30108f718f92721af3b95e74349a'),
                         (data.download_cifar100, 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
                          'eb9058c3a382ffc7106e4002c42a8d85')]:
        params = inspect.signature(fn).parameters
        assert list(params) == ['root', 'url', 'md5']
        assert (params['url'].default, params['md5'].default) == (url, md5)
    assert (data.URL, data.MD5, data.URL100, data.MD5_100) == (c10.url, c10.md5, c100.url, c100.md5)


@pytest.mark.parametrize('as_folder', [False, True, 'renamed'])
def test_root_is_parent_or_folder(cifar, ds, as_folder):
    root, written = cifar
    if as_folder == 'renamed':  # known by its files alone
        os.rename(root / ds.folder, root / 'mine')
    root = root / ('mine' if as_folder == 'renamed' else ds.folder) if as_folder else root
    assert load(ds, root)[3].tolist() == written[ds.test_file][1].tolist()
    first = ['airplane', 'automobile', 'bird'] if ds.name == 'cifar10' else ['apple', 'aquarium_fish', 'baby']
    assert data.load_class_names(str(root), ds.name)[:3] == first
    assert len(data.load_class_names(root, dataset=ds.name)) == ds.num_classes


def test_load_class_names_defaults_to_cifar10(tmp_path):
    make_cifar(tmp_path)
    make_cifar(tmp_path, dataset='cifar100')  # side by side in one root
    assert data.load_class_names(tmp_path)[0] == 'airplane' and len(data.load_class_names(tmp_path)) == 10
    assert data.load_class_names(tmp_path, 'cifar100')[0] == 'apple'


def test_missing_folder(tmp_path, ds, monkeypatch):
    """Worded for library users as well as the command line: the folder looked in (absolute, where root was
    relative) and the three fixes: root or --data naming the right folder, download=True, a download by hand."""
    monkeypatch.chdir(tmp_path)
    looked_in = re.escape(str(tmp_path / 'data'))
    with pytest.raises(DataError, match=rf'^no {ds.folder}/ in {looked_in} \(nor its files\): pass the '
                                        rf'folder holding {ds.folder}/ \(--data DIR on the command line, root in '
                                        rf'load_{ds.name}\(root\)\), or download=True to fetch it there, or '
                                        rf'download {ds.archive} by hand from {re.escape(ds.url)} and extract it '
                                        rf'there$'):
        load(ds, './data')
    assert not (tmp_path / 'data').exists()  # looking creates nothing


@pytest.mark.parametrize('files', [['test'], ['train', 'test'], ['meta', 'test']])
def test_generic_names_are_not_cifar100(tmp_path, files):
    """A folder holding a file called test (or two of train/test/meta) is not taken for cifar-100-python/."""
    for f in files:
        (tmp_path / f).write_bytes(b'something else')
    with pytest.raises(DataError, match=r'no cifar-100-python/ in .*download=True'):
        data.load_cifar100(tmp_path)


def _missing_files():  # a list: parametrize takes a Collection, not a generator
    return [pytest.param(ds.name, name, id=f'{ds.name}-{name}') for ds in data.DATASETS.values()
            for name in [ds.train_files[-1], ds.test_file, ds.meta_file]]


@pytest.mark.parametrize('dataset, name', _missing_files())
def test_missing_file(tmp_path, dataset, name):
    ds = data.DATASETS[dataset]
    make_cifar(tmp_path, dataset=dataset)
    os.remove(tmp_path / ds.folder / name)
    with pytest.raises(DataError, match=rf'missing .*{name}: {ds.folder}/ is incomplete.*{ds.archive}.*--data DIR'):
        load(ds, tmp_path)


@pytest.mark.parametrize('keep', [0, 10, 0.5])
def test_truncated_file(cifar, ds, keep):
    root, _ = cifar
    name = ds.train_files[-1]
    path = root / ds.folder / name
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DataError, match=rf'{name} .*truncated or corrupt; delete {ds.folder}/.*{ds.archive}'):
        load(ds, root)


ZEROS = np.zeros((N, 3072), np.uint8)  # a valid batch's data and labels
LABELS = [0] * N


# Each entry: (ds -> file content, what the message says, with {k} the number of classes and {key} the label key)
@pytest.mark.parametrize('make, why', [
    pytest.param(lambda ds: batch_bytes(np.zeros((N, 3071), np.uint8), LABELS, ds.name),
                 r'expected uint8 \[n, 3072\]', id='shape'),
    pytest.param(lambda ds: batch_bytes(np.zeros((N, 3072), np.uint16), LABELS, ds.name), r'uint16', id='uint16'),
    pytest.param(lambda ds: batch_bytes(np.zeros((N, 3072), np.float32), LABELS, ds.name), r'float32', id='float32'),
    pytest.param(lambda ds: batch_bytes(ZEROS, [ds.num_classes] + LABELS[1:], ds.name),
                 r'labels span 0..{k}, expected 0..{k_1}', id='label-too-big'),
    pytest.param(lambda ds: batch_bytes(ZEROS, [-1] + LABELS[1:], ds.name), r'labels span -1..0', id='label-minus-1'),
    pytest.param(lambda ds: batch_bytes(ZEROS, LABELS[1:], ds.name), r'19 labels for 20 images', id='label-count'),
    pytest.param(lambda ds: py2_pickle({b'data': ZEROS, ds.label_key.encode(): [b'cat'] * N}),
                 r"'{key}' is .*expected a list of ints", id='label-str'),
    pytest.param(lambda ds: py2_pickle({b'data': ZEROS}), r"lack 'data' or '{key}'", id='no-labels'),
    pytest.param(lambda ds: batch_bytes(ZEROS, LABELS, 'cifar100' if ds.name == 'cifar10' else 'cifar10'),
                 r"lack 'data' or '{key}'", id='other-data-sets-file'),
    pytest.param(lambda ds: b'\x80\x02](K\x01e.', r'holds a list, not a dict', id='not-a-dict'),
])
def test_bad_content(cifar, ds, make, why):
    root, _ = cifar
    name = ds.train_files[0]
    (root / ds.folder / name).write_bytes(make(ds))
    why = why.format(k=ds.num_classes, k_1=ds.num_classes - 1, key=ds.label_key)
    with pytest.raises(DataError, match=rf'{name}:? .*{why}.*not an? (intact )?{ds.title} file'):
        load(ds, root)


@pytest.mark.parametrize('how', ['os.system', 'open', 'nested'])
def test_malicious_pickle_runs_nothing(cifar, ds, how):
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
        evil = py2_pickle({b'data': ZEROS, ds.label_key.encode(): RawOps(evil[2:-1])})
    name = ds.train_files[0]
    (root / ds.folder / name).write_bytes(evil)
    with pytest.raises(DataError, match=rf'refusing to unpickle (posix\.system|io\.open) in .*{name}: '
                                        rf'not a {ds.title} file.*{ds.archive}'):
        load(ds, root)
    assert not marker.exists()


@pytest.mark.parametrize('name', ['nope', 'CIFAR10', 'cifar-10'])
def test_unknown_data_set(tmp_path, name):
    make_cifar(tmp_path)
    for call in (lambda: data.load_dataset(name, tmp_path), lambda: data.load_class_names(tmp_path, name)):
        with pytest.raises(DataError, match=rf"unknown data set '{name}': use one of cifar10, cifar100$"):
            call()


# ----------------------------------------------------------------------------------------------------------------
# Download, md5, extraction

def assert_only(folder, names):
    assert sorted(os.listdir(folder)) == sorted(names)  # no temp files, no partial folders


def test_download_file_url(tarball, tmp_path, ds, capsys):
    path, md5 = tarball
    dest = tmp_path / 'dest'
    folder = download(ds, dest, url=path.as_uri(), md5=md5)
    assert folder == str(dest / ds.folder)
    assert_only(dest, [ds.folder, ds.archive])
    assert load(ds, dest)[0].shape == (5 * N, 3, 32, 32)
    assert 'MB' in capsys.readouterr().err  # the progress bar
    assert download(ds, dest, url='http://unused.invalid/', md5=md5) == folder  # already there
    # a verified archive is extracted again without fetching anything
    os.rename(dest / ds.folder, tmp_path / 'moved')
    assert download(ds, dest, url='http://unused.invalid/', md5=md5) == folder
    assert_only(dest, [ds.folder, ds.archive])


def serve_as_official(monkeypatch, ds, url, md5):
    """Make load_dataset(ds.name, ..., download=True) fetch url (checked against md5) instead of the real one."""
    monkeypatch.setitem(data.DATASETS, ds.name, ds._replace(url=url, md5=md5))


def test_download_http_and_load(tarball, tmp_path, ds, monkeypatch):
    path, md5 = tarball
    dest = tmp_path / 'dest'
    with serve(path.parent) as base:
        with pytest.raises(DataError, match=rf'could not download .*404.*{ds.archive} by hand.*--data DIR'):
            download(ds, dest, url=f'{base}/nope.tar.gz', md5=md5)
        assert not dest.exists()  # the folder the failed download made is gone
        serve_as_official(monkeypatch, ds, f'{base}/{path.name}', md5)
        x_train, y_train, x_test, y_test = load(ds, dest, download=True)
    assert x_test.shape == (N, 3, 32, 32)
    assert_only(dest, [ds.folder, ds.archive])


def test_download_md5_mismatch(tarball, tmp_path, ds):
    path, md5 = tarball
    dest = tmp_path / 'dest'
    with pytest.raises(DataError, match=rf'md5 mismatch .*expected 0{{32}}, got {md5}.*not {ds.archive}'):
        download(ds, dest, url=path.as_uri(), md5='0' * 32)
    assert not dest.exists()  # the folder it made is gone with the bad download


def test_download_failure_says_what_to_do(tmp_path, ds):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    (tmp_path / 'mine').mkdir()  # a folder the user made: kept, as found
    for url in [f'http://127.0.0.1:{port}/c.tar.gz', (tmp_path / 'absent.tar.gz').as_uri(), 'ftp://127.0.0.1/x']:
        for dest in (tmp_path / 'new' / 'dest', tmp_path / 'mine'):
            with pytest.raises(DataError, match=rf'could not download .*{ds.archive} by hand from {ds.url}.*--data '
                                                rf'DIR on the command line, root in load_{ds.name}\(root\)'):
                download(ds, dest, url=url, md5=ds.md5)
        assert_only(tmp_path, ['mine'])  # no empty folders left behind, neither dest nor the one above it
        assert_only(tmp_path / 'mine', [])


def test_corrupt_archive(tmp_path, ds):
    bad = tmp_path / 'bad.tar.gz'
    bad.write_bytes(b'not a gzip file' * 100)
    with pytest.raises(DataError, match=r'cannot extract'):
        download(ds, tmp_path / 'dest', url=bad.as_uri(), md5=hashlib.md5(bad.read_bytes()).hexdigest())
    assert_only(tmp_path / 'dest', [ds.archive])


def _member(name, kind=tarfile.REGTYPE, link=''):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize('make', [  # (tmp_path, the data set's folder) -> the bad member
    pytest.param(lambda t, f: _member(str(t / 'abs_evil')), id='absolute'),
    pytest.param(lambda t, f: _member('../evil'), id='dotdot'),
    pytest.param(lambda t, f: _member(f'{f}/../../evil'), id='inner-dotdot'),
    pytest.param(lambda t, f: _member('evil'), id='outside-folder'),
    pytest.param(lambda t, f: _member('cifar-10-batches-py/x' if '100' in f else 'cifar-100-python/x'),
                 id='other-data-sets-folder'),
    pytest.param(lambda t, f: _member(f'{f}/link', tarfile.SYMTYPE, '/etc/passwd'), id='symlink'),
    pytest.param(lambda t, f: _member(f'{f}/hard', tarfile.LNKTYPE, '/etc/passwd'), id='hardlink'),
    pytest.param(lambda t, f: _member(f'{f}/dev', tarfile.CHRTYPE), id='device'),
])
def test_unsafe_member_rejected_before_extracting(tmp_path, ds, make):
    make_cifar(tmp_path / 'src', dataset=ds.name)
    info = make(tmp_path, ds.folder)
    path = tmp_path / 'src' / ds.archive
    md5 = make_tarball(tmp_path / 'src', path, extra=[(info, b'' if info.islnk() or info.issym() else b'x')],
                       dataset=ds.name)
    dest = tmp_path / 'a' / 'dest'  # '../../evil' from here would land in tmp_path
    with pytest.raises(DataError, match=rf'unsafe member {info.name!r}.*nothing was extracted.*not {ds.archive}'):
        download(ds, dest, url=path.as_uri(), md5=md5)
    assert_only(dest, [ds.archive])  # the valid files before the bad member were not written either
    assert not any(p.name in ('evil', 'abs_evil') for p in tmp_path.rglob('*'))


# ----------------------------------------------------------------------------------------------------------------
# The wrong data set: asked for one, root is or holds the other

def _other(ds):
    return data.DATASETS['cifar100' if ds.name == 'cifar10' else 'cifar10']


@pytest.mark.parametrize('renamed', [False, True])
@pytest.mark.parametrize('with_download', [False, True])
def test_root_is_the_other_data_sets_folder(tmp_path, ds, renamed, with_download, monkeypatch):
    """Fails at once, never downloading into the other's folder (which would nest one folder in the other)."""
    other = _other(ds)
    make_cifar(tmp_path, dataset=other.name)
    root = tmp_path / other.folder
    if renamed:  # known by its files alone
        root = root.rename(tmp_path / 'mine')
    before = sorted(os.listdir(root))
    serve_as_official(monkeypatch, ds, (tmp_path / 'never-fetched.tar.gz').as_uri(), ds.md5)
    with pytest.raises(DataError, match=rf'^{root} is the {other.title} folder, not {ds.title}: pass --dataset '
                                        rf'{other.name}, or pass --data the folder above it \(download=True '
                                        rf'fetches {ds.folder}/ there\)$'):
        load(ds, root, download=with_download)
    assert sorted(os.listdir(root)) == before  # nothing fetched, nothing written


def test_root_holds_only_the_other_data_set(tmp_path, ds):
    other = _other(ds)
    make_cifar(tmp_path, dataset=other.name)
    with pytest.raises(DataError, match=rf'^{tmp_path} holds {other.title} \({other.folder}/\), not {ds.title}: '
                                        rf'pass --dataset {other.name}, or put {ds.folder}/ there '
                                        rf'\(download=True fetches it\)$'):
        load(ds, tmp_path)
    assert data.load_dataset(other.name, tmp_path)[0].shape == (5 * N, 3, 32, 32)  # the other still loads


def test_download_beside_the_other_data_set(tarball, tmp_path, ds, monkeypatch):
    """Both data sets may live in one --data folder: download=True fetches the one asked for beside the other."""
    path, md5 = tarball
    other = _other(ds)
    dest = tmp_path / 'dest'
    make_cifar(dest, dataset=other.name)
    serve_as_official(monkeypatch, ds, path.as_uri(), md5)
    assert load(ds, dest, download=True)[0].shape == (5 * N, 3, 32, 32)
    assert_only(dest, [ds.folder, ds.archive, other.folder])
    assert data.load_dataset(other.name, dest)[0].shape == (5 * N, 3, 32, 32)


def test_failed_download_beside_the_other_data_set_says_so(tmp_path, ds, monkeypatch):
    other = _other(ds)
    make_cifar(tmp_path, dataset=other.name)
    serve_as_official(monkeypatch, ds, (tmp_path / 'absent.tar.gz').as_uri(), ds.md5)  # no network here either
    with pytest.raises(DataError, match=rf'^could not download .*{ds.archive} by hand.*; note that {tmp_path} holds '
                                        rf'{other.title} \({other.folder}/\), not {ds.title}: pass --dataset '
                                        rf'{other.name}, or put {ds.folder}/ there$'):
        load(ds, tmp_path, download=True)
    assert_only(tmp_path, [other.folder])


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
