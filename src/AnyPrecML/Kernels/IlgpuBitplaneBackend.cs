using System.Runtime.CompilerServices;
using AnyPrecML.Quantization;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;

namespace AnyPrecML.Kernels;

/// <summary>
/// The bitplane product as an ILGPU kernel: one group of one warp per (row, token); the row's b-bit
/// table goes to shared memory; lane i reads words i, i+warp, ... of each plane, so a warp's reads of a
/// plane are consecutive words (coalesced); a shuffle reduction sums the lanes. Runs on CUDA in
/// production and on ILGPU's CPU accelerator in tests (scalar speed: never the CPU production path).
/// Planes and tables are copied to the device once per matrix and kept there while the matrix lives.
/// </summary>
public sealed class IlgpuBitplaneBackend : BitplaneBackend, IDisposable
{
    private readonly Context _context;
    private readonly Accelerator _accelerator;
    private readonly Action<KernelConfig, ArrayView<uint>, ArrayView<float>, ArrayView<float>, ArrayView<float>, KernelShape> _kernel;
    private readonly ConditionalWeakTable<BitplaneMatrix, DeviceWeights> _weights = new();
    private readonly object _gate = new();
    private MemoryBuffer1D<float, Stride1D.Dense>? _x, _y;

    private IlgpuBitplaneBackend(Context context, Accelerator accelerator)
    {
        _context = context;
        _accelerator = accelerator;
        _kernel = accelerator.LoadStreamKernel<ArrayView<uint>, ArrayView<float>, ArrayView<float>, ArrayView<float>, KernelShape>(Kernel);
    }

    /// <summary>The first CUDA device, or null when there is none (or no CUDA driver).</summary>
    public static IlgpuBitplaneBackend? TryCreateCuda()
    {
        Context? context = null;
        try
        {
            context = Context.Create(b => b.Cuda());
            var devices = context.GetCudaDevices();
            if (devices.Count == 0) { context.Dispose(); return null; }
            return new IlgpuBitplaneBackend(context, devices[0].CreateAccelerator(context));
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            context?.Dispose();
            return null;
        }
    }

    /// <summary>ILGPU's CPU accelerator (multi-threaded scalar emulation of warps): for testing the kernel without a GPU.</summary>
    public static IlgpuBitplaneBackend CreateCpu()
    {
        var context = Context.Create(b => b.CPU());
        return new IlgpuBitplaneBackend(context, context.CreateCPUAccelerator(0));
    }

    /// <inheritdoc/>
    public override string Name => $"ILGPU {_accelerator.AcceleratorType} ({_accelerator.Name})";

    /// <summary>Parameters of one launch.</summary>
    public readonly record struct KernelShape(int Rows, int Cols, int Words, int Bits, long PlaneStride);

    private sealed class DeviceWeights(MemoryBuffer1D<uint, Stride1D.Dense> planes, MemoryBuffer1D<float, Stride1D.Dense>[] tables) : IDisposable
    {
        public MemoryBuffer1D<uint, Stride1D.Dense> Planes { get; } = planes;
        public MemoryBuffer1D<float, Stride1D.Dense>[] Tables { get; } = tables;
        public void Dispose() { Planes.Dispose(); foreach (var t in Tables) t.Dispose(); }
    }

    /// <inheritdoc/>
    public override void Multiply(BitplaneMatrix weight, int bits, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        Check(weight, bits, x, tokens, y);
        lock (_gate)
        {
            var dw = _weights.GetValue(weight, Upload);
            _x = Ensure(_x, x.Length);
            _y = Ensure(_y, y.Length);
            _x.View.AsContiguous().SubView(0, x.Length).CopyFromCPU(x);
            int warp = _accelerator.WarpSize;
            var shape = new KernelShape(weight.Rows, weight.Cols, weight.WordsPerRow, bits, weight.PlaneStride);
            _kernel(new KernelConfig(new Index2D(weight.Rows, tokens), new Index2D(warp, 1)),
                dw.Planes.View, dw.Tables[bits - weight.SeedBits].View, _x.View, _y.View, shape);
            _accelerator.Synchronize();
            _y.View.AsContiguous().SubView(0, y.Length).CopyToCPU(y);
        }
    }

    private MemoryBuffer1D<float, Stride1D.Dense> Ensure(MemoryBuffer1D<float, Stride1D.Dense>? buffer, long length)
    {
        if (buffer is not null && buffer.Length >= length) return buffer;
        buffer?.Dispose();
        return _accelerator.Allocate1D<float>(Math.Max(length, 1024));
    }

    private DeviceWeights Upload(BitplaneMatrix m)
    {
        var planes = _accelerator.Allocate1D<uint>(m.AllPlanes.Length);
        planes.View.AsContiguous().CopyFromCPU(m.AllPlanes);
        var tables = new MemoryBuffer1D<float, Stride1D.Dense>[m.ParentBits - m.SeedBits + 1];
        for (int b = m.SeedBits; b <= m.ParentBits; b++)
        {
            var t = m.Table(b);
            var f = new float[t.Length];
            for (int i = 0; i < f.Length; i++) f[i] = (float)t[i];
            tables[b - m.SeedBits] = _accelerator.Allocate1D(f);
        }
        return new DeviceWeights(planes, tables);
    }

    /// <summary>One warp computes y[token, row]: table to shared memory, lanes over words, shuffle reduction.</summary>
    private static void Kernel(ArrayView<uint> planes, ArrayView<float> table, ArrayView<float> x, ArrayView<float> y, KernelShape s)
    {
        int row = Grid.IdxX, token = Grid.IdxY, lane = Group.IdxX, width = Group.DimX;
        var shared = SharedMemory.Allocate<float>(256);
        int k = 1 << s.Bits;
        for (int i = lane; i < k; i += width) shared[i] = table[(long)row * k + i];
        Group.Barrier();

        float acc = 0;
        long rowBase = (long)row * s.Words;
        long xBase = (long)token * s.Cols;
        for (int word = lane; word < s.Words; word += width)
        {
            // Up to eight plane words; the planes past b read as zero, and the code is shifted down.
            uint w0 = planes[rowBase + word];
            uint w1 = s.Bits > 1 ? planes[rowBase + s.PlaneStride + word] : 0u;
            uint w2 = s.Bits > 2 ? planes[rowBase + 2 * s.PlaneStride + word] : 0u;
            uint w3 = s.Bits > 3 ? planes[rowBase + 3 * s.PlaneStride + word] : 0u;
            uint w4 = s.Bits > 4 ? planes[rowBase + 4 * s.PlaneStride + word] : 0u;
            uint w5 = s.Bits > 5 ? planes[rowBase + 5 * s.PlaneStride + word] : 0u;
            uint w6 = s.Bits > 6 ? planes[rowBase + 6 * s.PlaneStride + word] : 0u;
            uint w7 = s.Bits > 7 ? planes[rowBase + 7 * s.PlaneStride + word] : 0u;
            int n = s.Cols - 32 * word;
            if (n > 32) n = 32;
            for (int e = 0; e < n; e++)
            {
                int code = (int)(((w0 >> e) & 1) << 7 | ((w1 >> e) & 1) << 6 | ((w2 >> e) & 1) << 5 | ((w3 >> e) & 1) << 4
                    | ((w4 >> e) & 1) << 3 | ((w5 >> e) & 1) << 2 | ((w6 >> e) & 1) << 1 | ((w7 >> e) & 1)) >> (8 - s.Bits);
                acc += shared[code] * x[xBase + 32 * word + e];
            }
        }
        for (int offset = width / 2; offset > 0; offset /= 2) acc += Warp.ShuffleDown(acc, offset);
        if (lane == 0) y[(long)token * s.Rows + row] = acc;
    }

    /// <summary>Frees the device memory and the accelerator.</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            _x?.Dispose();
            _y?.Dispose();
            _accelerator.Dispose();
            _context.Dispose();
        }
    }
}
