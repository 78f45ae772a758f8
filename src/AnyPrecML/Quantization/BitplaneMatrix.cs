using System.Runtime.InteropServices;
using AnyPrecML.Models;

namespace AnyPrecML.Quantization;

/// <summary>
/// One any-precision linear weight [rows, cols]: n bitplanes and a centroid table per width.
/// Plane p holds bit (n-1-p) of every parent code, most significant first, packed per row into
/// 32-bit words (element j in word j/32, bit j%32). The b-bit code of an element is the top b bits
/// of its parent code, so a b-bit consumer reads planes 0..b-1 and the b-bit table [rows, 2^b] only.
/// Each plane holds <see cref="PlaneRows"/> rows, the last ones zero padding (<see cref="PaddedPlaneRows"/>).
/// The planes and tables are views: of arrays after quantization, of the mapped file after loading.
/// </summary>
public sealed class BitplaneMatrix
{
    private readonly Storage _storage;

    private BitplaneMatrix(string name, int rows, int cols, int seedBits, int parentBits, int planeRows, Storage storage)
    {
        Name = name; Rows = rows; Cols = cols; SeedBits = seedBits; ParentBits = parentBits; PlaneRows = planeRows; _storage = storage;
        WordsPerRow = (cols + 31) / 32;
    }

    /// <summary>Layer name (model.layers.0.self_attn.q_proj).</summary>
    public string Name { get; }
    /// <summary>Output rows.</summary>
    public int Rows { get; }
    /// <summary>Input columns.</summary>
    public int Cols { get; }
    /// <summary>Narrowest width served.</summary>
    public int SeedBits { get; }
    /// <summary>Parent width n: planes stored.</summary>
    public int ParentBits { get; }
    /// <summary>32-bit words per row in each plane: ceil(cols / 32).</summary>
    public int WordsPerRow { get; }
    /// <summary>Rows each plane holds: <see cref="Rows"/>, then zero rows up to <see cref="PaddedPlaneRows"/> (models written before format 3: none).</summary>
    public int PlaneRows { get; }
    /// <summary>Words from one plane to the next.</summary>
    internal long PlaneStride => (long)PlaneRows * WordsPerRow;

    /// <summary>
    /// Rows a plane is padded to, so that the b planes a product streams at once never start at nearly the same place
    /// modulo 64 KB. Unpadded, the 1.1B shape's planes are whole multiples of 64 KB apart (2048×5632: 22×64 KB), every
    /// plane's row r falls in the same sets of a 1024- or 2048-set L2, and the b streams and what the prefetchers
    /// fetch ahead for them evict each other: a decode step's products read their weights 10-30% slower at b ≥ 4
    /// (Zen 4, both paths; docs/BENCHMARKS.md "Eleventh session"). The fewest rows that put every two of eight
    /// consecutive planes at least 2 KB (32 cache lines) apart modulo 64 KB, or failing that (rows of 4 bytes) the widest
    /// such gap, within <see cref="MaxPaddingRows"/> more; planes under 64 KB are left as they are (a whole matrix then
    /// sits in L2).
    /// </summary>
    public static int PaddedPlaneRows(int rows, int cols)
    {
        long rowBytes = 4L * ((cols + 31) / 32);
        if (rows * rowBytes < Period) return rows;
        int best = rows;
        long bestGap = -1;
        for (int r = rows; r <= rows + MaxPaddingRows; r++)
        {
            long gap = long.MaxValue;
            for (int d = 1; d < 8; d++)
            {
                long offset = (long)d * r * rowBytes % Period;
                gap = Math.Min(gap, Math.Min(offset, Period - offset));
            }
            if (gap > bestGap) (best, bestGap) = (r, gap);
            if (gap >= MinGap) break;
        }
        return best;
    }

    private const long Period = 64 << 10, MinGap = 2 << 10;

    /// <summary>The most padding rows a plane has (what a reader accepts beyond a linear's rows).</summary>
    public const int MaxPaddingRows = 256;

    /// <summary>Plane <paramref name="p"/> (bit n-1-p of each code): [rows, WordsPerRow].</summary>
    public ReadOnlySpan<uint> Plane(int p)
    {
        if ((uint)p >= (uint)ParentBits) throw new ArgumentOutOfRangeException(nameof(p), p, $"plane must be in 0..{ParentBits - 1}.");
        return _storage.Planes.Slice((int)(p * PlaneStride), Rows * WordsPerRow);
    }

    /// <summary>The b-bit centroid table [rows, 2^b] in fp16.</summary>
    public ReadOnlySpan<Half> Table(int bits) => _storage.Table(CheckBits(bits));

    /// <summary>Throws <see cref="ArgumentOutOfRangeException"/> unless <paramref name="bits"/> is in seed..parent.</summary>
    public int CheckBits(int bits) => bits >= SeedBits && bits <= ParentBits ? bits
        : throw new ArgumentOutOfRangeException(nameof(bits), bits, $"{Name} serves {SeedBits}..{ParentBits} bits.");

    /// <summary>The b-bit codes of row <paramref name="row"/>, read from planes 0..b-1.</summary>
    public void RowCodes(int row, int bits, Span<byte> codes)
    {
        CheckBits(bits);
        codes = codes[..Cols];
        codes.Clear();
        for (int p = 0; p < bits; p++)
        {
            var words = Plane(p).Slice(row * WordsPerRow, WordsPerRow);
            for (int j = 0; j < Cols; j++) codes[j] = (byte)((codes[j] << 1) | (int)((words[j >> 5] >> (j & 31)) & 1u));
        }
    }

    /// <summary>The b-bit weight [rows, cols] in fp32: each element's centroid in its row's b-bit table.</summary>
    public float[] Dequantize(int bits)
    {
        var w = new float[(long)Rows * Cols];
        var table = Table(bits);
        int k = 1 << bits;
        var codes = new byte[Cols];
        for (int r = 0; r < Rows; r++)
        {
            RowCodes(r, bits, codes);
            var t = table.Slice(r * k, k);
            var dst = w.AsSpan(r * Cols, Cols);
            for (int j = 0; j < Cols; j++) dst[j] = (float)t[codes[j]];
        }
        return w;
    }

    /// <summary>Bytes a b-bit consumer reads: b planes and the b-bit table.</summary>
    public long BytesRead(int bits) => (long)CheckBits(bits) * Rows * WordsPerRow * 4 + (long)Rows * (1 << bits) * 2;

    /// <summary>Packs quantized rows into planes and fp16 tables, rows in parallel on at most <paramref name="maxDegreeOfParallelism"/> threads (≤ 0: all cores).</summary>
    public static BitplaneMatrix FromRows(string name, IReadOnlyList<RowQuantization> rows, int cols, int maxDegreeOfParallelism = -1)
    {
        if (rows.Count == 0) throw new ArgumentException("no rows.", nameof(rows));
        int seed = rows[0].SeedBits, parent = rows[0].ParentBits, words = (cols + 31) / 32, n = rows.Count, planeRows = PaddedPlaneRows(n, cols);
        // Pinned: the kernels read planes and tables through raw pointers, as they do from a mapped file.
        var planes = GC.AllocateArray<uint>(checked((int)((long)parent * planeRows * words)), pinned: true);
        var tables = new Half[parent - seed + 1][];
        for (int b = seed; b <= parent; b++) tables[b - seed] = GC.AllocateArray<Half>(n * (1 << b), pinned: true);
        for (int r = 0; r < n; r++)
            if (rows[r].Codes.Length != cols || rows[r].SeedBits != seed || rows[r].ParentBits != parent) throw new ArgumentException($"row {r} does not match the others.");
        // Rows own disjoint words of every plane, so they pack in parallel: a serial pass here was a fixed
        // share of quantization time that no number of cores shortened.
        Parallel.For(0, n, new ParallelOptions { MaxDegreeOfParallelism = maxDegreeOfParallelism > 0 ? maxDegreeOfParallelism : -1 }, r =>
        {
            var q = rows[r];
            for (int p = 0; p < parent; p++)
            {
                int shift = parent - 1 - p;
                var dst = planes.AsSpan((int)(((long)p * planeRows + r) * words), words);
                for (int w = 0; w < words; w++)
                {
                    uint word = 0;
                    int end = Math.Min(32, cols - 32 * w);
                    for (int bit = 0; bit < end; bit++) word |= (uint)((q.Codes[32 * w + bit] >> shift) & 1) << bit;
                    dst[w] = word;
                }
            }
            for (int b = seed; b <= parent; b++)
                for (int c = 0; c < 1 << b; c++) tables[b - seed][r * (1 << b) + c] = (Half)q.Table(b)[c];
        });
        return new BitplaneMatrix(name, n, cols, seed, parent, planeRows, new ArrayStorage(planes, tables, seed));
    }

    /// <summary>
    /// A matrix over existing planes [parent, rows, ceil(cols/32)] and fp16 tables (one per b in seed..parent,
    /// [rows, 2^b]); the arrays are copied into pinned memory (planes padded, <see cref="PaddedPlaneRows"/>). For
    /// importing other formats and for benchmarks.
    /// </summary>
    public static BitplaneMatrix Create(string name, int rows, int cols, int seedBits, int parentBits, ReadOnlySpan<uint> planes, IReadOnlyList<Half[]> tables)
    {
        new QuantizerOptions { SeedBits = seedBits, ParentBits = parentBits }.Validated();
        ArgumentOutOfRangeException.ThrowIfLessThan(rows, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(cols, 1);
        int words = (cols + 31) / 32;
        if (planes.Length != (long)parentBits * rows * words) throw new ArgumentException($"{planes.Length} plane words; {parentBits} × {rows} × {words} expected.", nameof(planes));
        if (tables.Count != parentBits - seedBits + 1) throw new ArgumentException($"{tables.Count} tables; one per width {seedBits}..{parentBits} expected.", nameof(tables));
        int planeRows = PaddedPlaneRows(rows, cols);
        var pinnedPlanes = GC.AllocateArray<uint>(checked((int)((long)parentBits * planeRows * words)), pinned: true);
        for (int p = 0; p < parentBits; p++)
            planes.Slice((int)((long)p * rows * words), rows * words).CopyTo(pinnedPlanes.AsSpan((int)((long)p * planeRows * words)));
        var pinnedTables = new Half[tables.Count][];
        for (int b = seedBits; b <= parentBits; b++)
        {
            var t = tables[b - seedBits];
            if (t.Length != rows << b) throw new ArgumentException($"the {b}-bit table has {t.Length} entries; {rows} × {1 << b} expected.", nameof(tables));
            pinnedTables[b - seedBits] = GC.AllocateArray<Half>(t.Length, pinned: true);
            t.CopyTo(pinnedTables[b - seedBits], 0);
        }
        return new BitplaneMatrix(name, rows, cols, seedBits, parentBits, planeRows, new ArrayStorage(pinnedPlanes, pinnedTables, seedBits));
    }

    /// <summary>Views of a loaded model's tensors (no copy); shapes and dtypes are checked.</summary>
    internal static BitplaneMatrix FromTensors(string name, int rows, int cols, int seedBits, int parentBits, TensorView planes, TensorView[] tables)
    {
        int words = (cols + 31) / 32;
        if (planes.DType != DType.U32) throw new ModelFormatException($"{planes.FilePath}: '{planes.Name}' is {planes.DType.Name()}, bitplanes are U32.");
        // Format 3 pads each plane to PaddedPlaneRows; earlier files hold exactly rows. Whatever the file says is the stride.
        long planeRows = planes.Shape.Count == 3 ? planes.Shape[1] : -1;
        if (planeRows < rows || planeRows > (long)rows + MaxPaddingRows || !planes.Shape.SequenceEqual([parentBits, planeRows, words]))
            throw new ModelFormatException($"{planes.FilePath}: tensor '{planes.Name}' has shape [{string.Join(", ", planes.Shape)}], expected [{parentBits}, R, {words}] with {rows} ≤ R ≤ {(long)rows + MaxPaddingRows}.");
        for (int b = seedBits; b <= parentBits; b++)
        {
            var t = tables[b - seedBits];
            if (t.DType != DType.F16) throw new ModelFormatException($"{t.FilePath}: '{t.Name}' is {t.DType.Name()}, centroid tables are F16.");
            t.Expect(rows, 1L << b);
        }
        return new BitplaneMatrix(name, rows, cols, seedBits, parentBits, (int)planeRows, new MappedStorage(planes, tables, seedBits));
    }

    private abstract class Storage
    {
        public abstract ReadOnlySpan<uint> Planes { get; }
        public abstract ReadOnlySpan<Half> Table(int bits);
    }

    private sealed class ArrayStorage(uint[] planes, Half[][] tables, int seed) : Storage
    {
        public override ReadOnlySpan<uint> Planes => planes;
        public override ReadOnlySpan<Half> Table(int bits) => tables[bits - seed];
    }

    private sealed class MappedStorage(TensorView planes, TensorView[] tables, int seed) : Storage
    {
        public override ReadOnlySpan<uint> Planes => MemoryMarshal.Cast<byte, uint>(planes.Bytes);
        public override ReadOnlySpan<Half> Table(int bits) => MemoryMarshal.Cast<byte, Half>(tables[bits - seed].Bytes);
    }

    /// <summary>The planes as stored, padding included: [parent, <see cref="PlaneRows"/>, <see cref="WordsPerRow"/>] (copied whole to a GPU).</summary>
    internal ReadOnlySpan<uint> AllPlanes => _storage.Planes;

    /// <summary>Address of plane 0, row 0 (pinned arrays or a mapped file: stable while the matrix lives).</summary>
    internal unsafe uint* PlanesPointer => (uint*)System.Runtime.CompilerServices.Unsafe.AsPointer(ref MemoryMarshal.GetReference(_storage.Planes));

    /// <summary>Address of the b-bit table (stable like <see cref="PlanesPointer"/>).</summary>
    internal unsafe Half* TablePointer(int bits) => (Half*)System.Runtime.CompilerServices.Unsafe.AsPointer(ref MemoryMarshal.GetReference(Table(bits)));
}
