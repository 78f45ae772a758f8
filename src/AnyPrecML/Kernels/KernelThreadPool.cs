namespace AnyPrecML.Kernels;

/// <summary>A range of work items run by <see cref="KernelThreadPool"/>.</summary>
public interface IRangeJob
{
    /// <summary>Runs items [start, end).</summary>
    void Execute(int start, int end);
}

/// <summary>
/// Dedicated threads for kernels: a call hands out chunks of its range to the workers and the calling
/// thread through one atomic counter, and allocates nothing (the job is an object the caller reuses).
/// Workers spin briefly after a call before they sleep, so the back-to-back calls of a decode step do
/// not pay a kernel wake-up each (as ONNX Runtime's spinning intra-op threads). A call made while
/// another is running (another thread, a nested call) runs inline on its own thread.
/// </summary>
public sealed class KernelThreadPool : IDisposable
{
    private static readonly Lazy<KernelThreadPool> LazyShared = new(() => new KernelThreadPool(Environment.ProcessorCount));

    private readonly Thread[] _workers;
    private readonly object _sleep = new();
    private readonly ManualResetEventSlim _done = new(false);
    private readonly object _gate = new();
    private IRangeJob? _job;
    private int _items, _chunk, _next, _running, _generation, _sleepers;
    private static readonly long SpinTicks = System.Diagnostics.Stopwatch.Frequency / 5000; // 200 µs
    private volatile bool _disposed;

    /// <summary>One pool for the process, with one thread per core (the caller counts as one).</summary>
    public static KernelThreadPool Shared => LazyShared.Value;

    /// <summary>A pool using <paramref name="threads"/> threads in all, the calling thread included.</summary>
    public KernelThreadPool(int threads)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(threads, 1);
        Threads = threads;
        _workers = new Thread[threads - 1];
        for (int i = 0; i < _workers.Length; i++)
        {
            _workers[i] = new Thread(WorkerLoop) { IsBackground = true, Name = $"AnyPrecML kernel {i + 1}" };
            _workers[i].Start();
        }
    }

    /// <summary>Threads working on a call, the caller included.</summary>
    public int Threads { get; }

    /// <summary>Runs <paramref name="job"/> over [0, <paramref name="items"/>) in chunks of <paramref name="chunk"/> items.</summary>
    public void Run(IRangeJob job, int items, int chunk)
    {
        if (items <= 0) return;
        chunk = Math.Max(1, chunk);
        if (_workers.Length == 0 || items <= chunk || !Monitor.TryEnter(_gate))
        {
            job.Execute(0, items);
            return;
        }
        try
        {
            _job = job; _items = items; _chunk = chunk; _next = 0;
            _running = _workers.Length + 1;
            _done.Reset();
            Interlocked.Increment(ref _generation);
            if (Volatile.Read(ref _sleepers) > 0) lock (_sleep) Monitor.PulseAll(_sleep);
            Work();
            if (Interlocked.Decrement(ref _running) != 0) _done.Wait();
            _job = null;
        }
        finally { Monitor.Exit(_gate); }
    }

    private void Work()
    {
        var job = _job!;
        while (true)
        {
            int start = Interlocked.Add(ref _next, _chunk) - _chunk;
            if (start >= _items) return;
            job.Execute(start, Math.Min(_items, start + _chunk));
        }
    }

    private void WorkerLoop()
    {
        int seen = 0;
        while (true)
        {
            long deadline = System.Diagnostics.Stopwatch.GetTimestamp() + SpinTicks;
            while (Volatile.Read(ref _generation) == seen && System.Diagnostics.Stopwatch.GetTimestamp() < deadline && !_disposed) Thread.SpinWait(30);
            if (Volatile.Read(ref _generation) == seen)
            {
                // Announce the sleep before the last look at the generation, and the caller bumps the
                // generation before it looks for sleepers: one of the two always sees the other. The
                // generation is re-checked under the lock, so a wake-up can be neither lost nor stolen
                // by a worker that is a call ahead (a counting semaphore allowed that).
                Interlocked.Increment(ref _sleepers);
                lock (_sleep)
                {
                    while (Volatile.Read(ref _generation) == seen && !_disposed) Monitor.Wait(_sleep);
                }
                Interlocked.Decrement(ref _sleepers);
                if (_disposed) return;
            }
            seen = Volatile.Read(ref _generation);
            try { Work(); }
            finally { if (Interlocked.Decrement(ref _running) == 0) _done.Set(); }
        }
    }

    /// <summary>Stops the workers.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        lock (_sleep) Monitor.PulseAll(_sleep);
        foreach (var w in _workers) w.Join(TimeSpan.FromSeconds(1));
    }
}
