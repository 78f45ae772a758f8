using System.IO.MemoryMappedFiles;

namespace AnyPrecML.Models;

/// <summary>
/// A read-only memory mapping of a whole file. Weights are read through it in place, so opening a
/// multi-gigabyte checkpoint costs address space, not memory, and pages come in only when used.
/// </summary>
/// <remarks>
/// Headers are read with ordinary reads (<see cref="ReadBytes"/>), which report a short file as an error, and the
/// file is mapped only when tensor data is first touched, after the loader has checked every size against the length
/// read at open and the file is checked to still have that length. A file truncated after that, while mapped, still
/// faults the process (SIGBUS): nothing in .NET can catch that. Our own writers never truncate in place (they write
/// a temporary file and rename it), so only an outside tool can; see docs/RELIABILITY.md.
/// </remarks>
internal sealed unsafe class MappedFile : IDisposable
{
    private readonly FileStream _stream;
    private readonly Lock _mapping = new();
    private MemoryMappedFile? _map;
    private MemoryMappedViewAccessor? _view;
    private byte* _pointer;
    private bool _disposed;

    public MappedFile(string path)
    {
        Path = path;
        _stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1);
        Length = _stream.Length;
        if (Length == 0)
        {
            _stream.Dispose();
            throw new ModelFormatException($"{path}: the file is empty.");
        }
    }

    public string Path { get; }
    /// <summary>The length when opened: every size the loaders check is checked against this.</summary>
    public long Length { get; }

    /// <summary>Bytes [offset, offset+count) read with ordinary reads (no mapping): a file that shrank since it was opened is an error, not a fault.</summary>
    public byte[] ReadBytes(long offset, int count, string what)
    {
        if (offset < 0 || count < 0 || offset > Length - count)
            throw new ModelFormatException($"{Path}: '{what}' lies outside the file ({offset}+{count} > {Length}).");
        var buffer = new byte[count];
        int done = 0;
        while (done < count)
        {
            int n = RandomAccess.Read(_stream.SafeFileHandle, buffer.AsSpan(done), offset + done);
            if (n == 0) throw new ModelFormatException($"{Path}: the file ended at {offset + done} bytes while reading '{what}'; it was {Length} bytes when opened (truncated underneath).");
            done += n;
        }
        return buffer;
    }

    /// <summary>Bytes [offset, offset+length) of the file; the range was checked against the file when the tensor was registered.</summary>
    public ReadOnlySpan<byte> Slice(long offset, long length, string what)
    {
        if (offset < 0 || length < 0 || offset > Length - length)
            throw new ModelFormatException($"{Path}: '{what}' lies outside the file ({offset}+{length} > {Length}).");
        if (length > int.MaxValue)
            throw new NotSupportedException($"{Path}: '{what}' is {length} bytes; tensors over 2 GiB cannot be viewed as one span.");
        byte* p = _pointer != null ? _pointer : Map();
        return new ReadOnlySpan<byte>(p + offset, (int)length);
    }

    /// <summary>Maps the file on first use, after checking it still has the length every header was validated against.</summary>
    private byte* Map()
    {
        lock (_mapping)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_pointer != null) return _pointer;
            long now = RandomAccess.GetLength(_stream.SafeFileHandle);
            if (now < Length)
                throw new ModelFormatException($"{Path}: the file is {now} bytes now but was {Length} when opened (truncated underneath); it is not mapped.");
            _map = MemoryMappedFile.CreateFromFile(_stream, null, Length, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: true);
            _view = _map.CreateViewAccessor(0, Length, MemoryMappedFileAccess.Read);
            byte* p = null;
            _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            _pointer = p + _view.PointerOffset;
            return _pointer;
        }
    }

    public void Dispose()
    {
        lock (_mapping)
        {
            if (_disposed) return;
            _disposed = true;
            if (_pointer != null) _view!.SafeMemoryMappedViewHandle.ReleasePointer();
            _pointer = null;
            _view?.Dispose();
            _map?.Dispose();
            _stream.Dispose();
        }
    }
}
