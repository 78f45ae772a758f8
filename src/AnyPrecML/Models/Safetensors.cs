using System.Numerics;
using System.Buffers.Binary;
using System.Text;
using System.Text.Json;

namespace AnyPrecML.Models;

/// <summary>
/// Reads the safetensors format: an 8-byte little-endian header length, a JSON header naming each
/// tensor's dtype, shape and [begin, end) data offsets, then the data. Every number in the header is
/// checked against the file before anything is allocated or read, so a lying header is an error, not
/// a crash or a huge allocation.
/// </summary>
public static class SafetensorsReader
{
    /// <summary>The largest header accepted (the format's own limit is 100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    /// <summary>Reads and checks <paramref name="path"/>'s header, and returns its tensors (views into the file, mapped on first use) and metadata.</summary>
    internal static (MappedFile File, List<TensorView> Tensors, Dictionary<string, string> Metadata) Open(string path)
    {
        var file = new MappedFile(path);
        try
        {
            var (tensors, metadata) = Parse(file);
            return (file, tensors, metadata);
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    private static (List<TensorView>, Dictionary<string, string>) Parse(MappedFile file)
    {
        string p = file.Path;
        if (file.Length < 8) throw new ModelFormatException($"{p}: truncated safetensors file ({file.Length} bytes, the header length alone takes 8).");
        ulong headerLen = BinaryPrimitives.ReadUInt64LittleEndian(file.ReadBytes(0, 8, "header length"));
        if (headerLen < 2 || headerLen > MaxHeaderBytes || (long)headerLen > file.Length - 8)
            throw new ModelFormatException($"{p}: safetensors header length {headerLen} is invalid for a file of {file.Length} bytes.");
        long dataStart = 8 + (long)headerLen;
        long dataLength = file.Length - dataStart;

        var header = file.ReadBytes(8, (int)headerLen, "header");
        // Names are read as strings below; invalid UTF-8 would surface there as a transcoding error (found by ParserMutationTests).
        if (!System.Text.Unicode.Utf8.IsValid(header)) throw new ModelFormatException($"{p}: safetensors header is not valid UTF-8.");
        using var doc = ModelJson.ParseDocument(p, () => JsonDocument.Parse(header, ModelJson.Options), "safetensors header is not valid JSON");
        return Tensors(file, doc, dataStart, dataLength);
    }

    private static (List<TensorView>, Dictionary<string, string>) Tensors(MappedFile file, JsonDocument doc, long dataStart, long dataLength)
    {
        string p = file.Path;
        if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new ModelFormatException($"{p}: safetensors header is not a JSON object.");
        var tensors = new List<TensorView>();
        var metadata = new Dictionary<string, string>();
        var ranges = new List<(long Begin, long End, string Name)>();
        foreach (var prop in doc.RootElement.EnumerateObject())
        {
            if (prop.Name == "__metadata__")
            {
                if (prop.Value.ValueKind != JsonValueKind.Object) throw new ModelFormatException($"{p}: __metadata__ is not an object.");
                foreach (var m in prop.Value.EnumerateObject())
                    metadata[m.Name] = m.Value.ValueKind == JsonValueKind.String ? m.Value.GetString()! : m.Value.GetRawText();
                continue;
            }
            string name = prop.Name;
            var v = prop.Value;
            if (v.ValueKind != JsonValueKind.Object
                || !v.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String
                || !v.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array
                || !v.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
                throw new ModelFormatException($"{p}: tensor '{name}' needs dtype, shape and two data_offsets.");
            DType dtype = DTypes.Parse(dt.GetString()!) ?? throw new ModelFormatException($"{p}: tensor '{name}' has unknown dtype '{dt.GetString()}'.");
            var shape = new long[sh.GetArrayLength()];
            int i = 0;
            foreach (var d in sh.EnumerateArray())
            {
                if (!d.TryGetInt64(out shape[i]) || shape[i] < 0) throw new ModelFormatException($"{p}: tensor '{name}' has an invalid dimension {d.GetRawText()}.");
                i++;
            }
            if (!off[0].TryGetInt64(out long begin) || !off[1].TryGetInt64(out long end) || begin < 0 || end < begin || end > dataLength)
                throw new ModelFormatException($"{p}: tensor '{name}' has data_offsets [{off[0].GetRawText()}, {off[1].GetRawText()}] outside the {dataLength} data bytes.");
            long count = TensorView.CheckedElementCount(shape) ?? throw new ModelFormatException($"{p}: tensor '{name}' has a shape whose size overflows.");
            if (count > long.MaxValue / 8 || count * dtype.Size() != end - begin)
                throw new ModelFormatException($"{p}: tensor '{name}' is {dtype.Name()}[{string.Join(", ", shape)}] but its data_offsets span {end - begin} bytes.");
            ranges.Add((begin, end, name));
            tensors.Add(new TensorView(name, dtype, shape, file, dataStart + begin));
        }
        ranges.Sort((a, b) => a.Begin.CompareTo(b.Begin));
        for (int k = 1; k < ranges.Count; k++)
            if (ranges[k].Begin < ranges[k - 1].End)
                throw new ModelFormatException($"{p}: tensors '{ranges[k - 1].Name}' and '{ranges[k].Name}' overlap.");
        return (tensors, metadata);
    }
}

/// <summary>A tensor to be written: its header entry and a callback that writes exactly its bytes.</summary>
public sealed record TensorToWrite(string Name, DType DType, long[] Shape, Action<Stream> WriteData)
{
    /// <summary>Bytes the data takes.</summary>
    public long ByteLength => (TensorView.CheckedElementCount(Shape) ?? throw new ArgumentException($"tensor '{Name}' has an invalid shape")) * DType.Size();

    /// <summary>An fp32 array written as <paramref name="dtype"/> (F32, F16 or BF16, rounding to nearest even).</summary>
    public static TensorToWrite FromFloats(string name, float[] data, long[] shape, DType dtype = DType.F32) =>
        new(name, dtype, shape, s => TensorEncoding.WriteFloats(s, data, dtype));
}

/// <summary>Writes safetensors files. The file appears under its name only once complete.</summary>
/// <summary>Progress of writing a model's tensors: bytes of data written of the total, and the tensor just written.</summary>
public readonly record struct WriteProgress(long Done, long Total, string Tensor);

public static class SafetensorsWriter
{
    /// <summary>
    /// <paramref name="tensors"/>, each reporting to <paramref name="progress"/> once its data is written: bytes of all of
    /// them so far, across every file they are split into.
    /// </summary>
    public static IReadOnlyList<TensorToWrite> Reporting(IReadOnlyList<TensorToWrite> tensors, IProgress<WriteProgress>? progress)
    {
        if (progress is null) return tensors;
        long total = tensors.Sum(t => t.ByteLength), done = 0;
        return [.. tensors.Select(t => t with { WriteData = s => { t.WriteData(s); progress.Report(new WriteProgress(done += t.ByteLength, total, t.Name)); } })];
    }

    /// <summary>Writes <paramref name="tensors"/> in order to <paramref name="path"/> (through a temporary file and a rename).</summary>
    public static void Write(string path, IReadOnlyList<TensorToWrite> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var header = new MemoryStream();
        using (var w = new Utf8JsonWriter(header))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject("__metadata__");
                foreach (var (k, v) in metadata) w.WriteString(k, v);
                w.WriteEndObject();
            }
            long offset = 0;
            foreach (var t in tensors)
            {
                w.WriteStartObject(t.Name);
                w.WriteString("dtype", t.DType.Name());
                w.WriteStartArray("shape");
                foreach (long d in t.Shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                offset += t.ByteLength;
                w.WriteNumberValue(offset);
                w.WriteEndArray();
                w.WriteEndObject();
            }
            w.WriteEndObject();
        }
        // The data section starts 8-byte aligned (the format pads the header with spaces).
        while (header.Length % 8 != 0) header.WriteByte((byte)' ');

        AtomicFile.Write(path, stream =>
        {
            Span<byte> len = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)header.Length);
            stream.Write(len);
            header.Position = 0;
            header.CopyTo(stream);
            foreach (var t in tensors)
            {
                long before = stream.Position;
                t.WriteData(stream);
                if (stream.Position - before != t.ByteLength)
                    throw new InvalidOperationException($"tensor '{t.Name}' wrote {stream.Position - before} bytes, its header says {t.ByteLength}.");
            }
        });
    }
}

/// <summary>Conversions of fp32 data to stored encodings.</summary>
public static class TensorEncoding
{
    /// <summary>Writes <paramref name="data"/> to <paramref name="stream"/> as little-endian F32, F16 or BF16.</summary>
    public static void WriteFloats(Stream stream, ReadOnlySpan<float> data, DType dtype)
    {
        const int Chunk = 16384;
        var buffer = new byte[Chunk * 4];
        for (int start = 0; start < data.Length; start += Chunk)
        {
            var part = data.Slice(start, Math.Min(Chunk, data.Length - start));
            int n;
            switch (dtype)
            {
                case DType.F32:
                    for (int i = 0; i < part.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(buffer.AsSpan(4 * i), part[i]);
                    n = 4 * part.Length;
                    break;
                case DType.F16:
                    for (int i = 0; i < part.Length; i++) BinaryPrimitives.WriteHalfLittleEndian(buffer.AsSpan(2 * i), (Half)part[i]);
                    n = 2 * part.Length;
                    break;
                case DType.BF16:
                    for (int i = 0; i < part.Length; i++) BinaryPrimitives.WriteUInt16LittleEndian(buffer.AsSpan(2 * i), ToBFloat16(part[i]));
                    n = 2 * part.Length;
                    break;
                default:
                    throw new ArgumentException($"cannot write floats as {dtype.Name()}", nameof(dtype));
            }
            stream.Write(buffer, 0, n);
        }
    }

    /// <summary>
    /// bf16 bits to fp32: each value's bits shifted up 16 (bf16 is the top half of an fp32). Whole vectors, then one at
    /// a time (a model's embedding table is 65M of them at the 1.1B shape, which a loop of one at a time took about a
    /// second to widen; the CPU attention widens a bf16 cache's rows with it at every step).
    /// </summary>
    public static void WidenBFloat16(ReadOnlySpan<ushort> bf16, Span<float> destination)
    {
        if (destination.Length < bf16.Length) throw new ArgumentException($"{bf16.Length} values do not fit {destination.Length}.", nameof(destination));
        var fp32Bits = System.Runtime.InteropServices.MemoryMarshal.Cast<float, uint>(destination);
        int i = 0;
        if (Vector.IsHardwareAccelerated)
            for (int w = Vector<ushort>.Count; i + w <= bf16.Length; i += w)
            {
                Vector.Widen(new Vector<ushort>(bf16[i..]), out var low, out var high);
                (low << 16).CopyTo(fp32Bits[i..]);
                (high << 16).CopyTo(fp32Bits[(i + w / 2)..]);
            }
        for (; i < bf16.Length; i++) fp32Bits[i] = (uint)bf16[i] << 16;
    }

    /// <summary>fp32 to bf16 bits, rounding to nearest even (NaN stays NaN).</summary>
    public static ushort ToBFloat16(float f)
    {
        uint bits = BitConverter.SingleToUInt32Bits(f);
        if (float.IsNaN(f)) return (ushort)((bits >> 16) | 0x40);
        uint rounding = 0x7FFF + ((bits >> 16) & 1);
        return (ushort)((bits + rounding) >> 16);
    }
}

/// <summary>Writes files and directories so that they appear under their final name only when complete.</summary>
public static class AtomicFile
{
    /// <summary>Writes through <paramref name="write"/> to a temporary file beside <paramref name="path"/>, flushes, then renames it over <paramref name="path"/>.</summary>
    public static void Write(string path, Action<Stream> write)
    {
        string full = Path.GetFullPath(path);
        string tmp = full + ".tmp-" + Guid.NewGuid().ToString("N")[..8];
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                write(fs);
                fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, full, overwrite: true);
        }
        catch
        {
            TryDelete(tmp);
            throw;
        }
    }

    /// <summary>Writes text the same way.</summary>
    public static void WriteText(string path, string text) => Write(path, s => { var b = Encoding.UTF8.GetBytes(text); s.Write(b); });

    /// <summary>Name of the file that marks a temporary directory as ours: "pid start-ticks" of the process building it.</summary>
    public const string PartialMarker = ".anyprec-partial";

    /// <summary>
    /// Builds a directory through <paramref name="fill"/> in a temporary sibling, then moves it to
    /// <paramref name="directory"/>. An existing directory is replaced only when <paramref name="overwrite"/> is set,
    /// and only after the new one is complete. The temporary directory carries a marker naming its process: on any
    /// error or cancellation it is removed, and one left by a killed process is removed by the next build of the same
    /// directory (<see cref="RemoveStaleTemporaries"/>).
    /// </summary>
    public static void WriteDirectory(string directory, bool overwrite, Action<string> fill)
    {
        string full = Path.GetFullPath(directory.TrimEnd(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar));
        if (File.Exists(full)) throw new IOException($"{full} is a file; a directory is to be written there.");
        if (Directory.Exists(full) && !overwrite && Directory.EnumerateFileSystemEntries(full).Any())
            throw new IOException($"{full} exists and is not empty; pass overwrite to replace it.");
        string parent = Path.GetDirectoryName(full) ?? ".";
        Directory.CreateDirectory(parent);
        RemoveStaleTemporaries(full);
        string tmp = Path.Combine(parent, TemporaryPrefix(full) + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(tmp);
        try
        {
            using (var me = System.Diagnostics.Process.GetCurrentProcess())
                File.WriteAllText(Path.Combine(tmp, PartialMarker), $"{Environment.ProcessId} {me.StartTime.ToUniversalTime().Ticks}");
            fill(tmp);
            File.Delete(Path.Combine(tmp, PartialMarker));
            if (Directory.Exists(full))
            {
                string old = tmp + ".old";
                Directory.Move(full, old);
                Directory.Move(tmp, full);
                Directory.Delete(old, recursive: true);
            }
            else Directory.Move(tmp, full);
        }
        catch
        {
            try { if (Directory.Exists(tmp)) Directory.Delete(tmp, recursive: true); } catch (IOException) { }
            throw;
        }
    }

    private static string TemporaryPrefix(string full) => "." + Path.GetFileName(full) + ".tmp-";

    /// <summary>
    /// Removes temporary directories that an earlier build of <paramref name="directory"/> left behind when it was
    /// killed: only siblings named like ours that hold our marker, and only when the process the marker names is gone
    /// (its id is free, or taken by a process that started at another time).
    /// </summary>
    public static void RemoveStaleTemporaries(string directory)
    {
        string full = Path.GetFullPath(directory.TrimEnd(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar));
        string parent = Path.GetDirectoryName(full) ?? ".";
        if (!Directory.Exists(parent)) return;
        foreach (var candidate in Directory.EnumerateDirectories(parent, TemporaryPrefix(full) + "*"))
        {
            string marker = Path.Combine(candidate, PartialMarker);
            string[] owner;
            try { owner = File.ReadAllText(marker).Split(' '); }
            catch (IOException)
            {
                // No marker: not ours, or finished, or killed between creating the directory and writing the marker
                // (microseconds apart). Only the last leaves it empty for long: an empty one over a minute old goes.
                try
                {
                    if (!Directory.EnumerateFileSystemEntries(candidate).Any() && DateTime.UtcNow - Directory.GetCreationTimeUtc(candidate) > TimeSpan.FromMinutes(1))
                        Directory.Delete(candidate);
                }
                catch (IOException) { } catch (UnauthorizedAccessException) { }
                continue;
            }
            if (owner.Length != 2 || !int.TryParse(owner[0], out int pid) || !long.TryParse(owner[1], out long ticks) || IsRunning(pid, ticks)) continue;
            try { Directory.Delete(candidate, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    private static bool IsRunning(int pid, long startTicks)
    {
        try
        {
            using var p = System.Diagnostics.Process.GetProcessById(pid);
            return !p.HasExited && p.StartTime.ToUniversalTime().Ticks == startTicks;
        }
        catch (ArgumentException) { return false; }           // no such process
        catch (InvalidOperationException) { return false; }   // it exited meanwhile
        catch (System.ComponentModel.Win32Exception) { return true; } // cannot tell: assume it is alive
    }

    private static void TryDelete(string path)
    {
        try { File.Delete(path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}
