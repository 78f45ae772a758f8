using System.IO.MemoryMappedFiles;

namespace AnyPrecML.Models;

/// <summary>
/// A read-only memory mapping of a whole file. Weights are read through it in place, so opening a
/// multi-gigabyte checkpoint costs address space, not memory, and pages come in only when used.
/// </summary>
internal sealed unsafe class MappedFile : IDisposable
{
    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private byte* _pointer;

    public MappedFile(string path)
    {
        Path = path;
        var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        Length = fs.Length;
        if (Length == 0)
        {
            fs.Dispose();
            throw new ModelFormatException($"{path}: the file is empty.");
        }
        _map = MemoryMappedFile.CreateFromFile(fs, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: false);
        _view = _map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref _pointer);
        _pointer += _view.PointerOffset;
    }

    public string Path { get; }
    public long Length { get; }

    /// <summary>Bytes [offset, offset+length) of the file; the range was checked against the file when the tensor was registered.</summary>
    public ReadOnlySpan<byte> Slice(long offset, long length, string what)
    {
        if (_pointer == null) throw new ObjectDisposedException(Path);
        if (offset < 0 || length < 0 || offset > Length - length)
            throw new ModelFormatException($"{Path}: '{what}' lies outside the file ({offset}+{length} > {Length}).");
        if (length > int.MaxValue)
            throw new NotSupportedException($"{Path}: '{what}' is {length} bytes; tensors over 2 GiB cannot be viewed as one span.");
        return new ReadOnlySpan<byte>(_pointer + offset, (int)length);
    }

    public void Dispose()
    {
        if (_pointer == null) return;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _pointer = null;
        _view.Dispose();
        _map.Dispose();
    }
}
