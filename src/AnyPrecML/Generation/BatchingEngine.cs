using System.Buffers;
using System.Diagnostics;
using System.Runtime.ExceptionServices;
using AnyPrecML.Models;

namespace AnyPrecML.Generation;

/// <summary>
/// Gathers the decode steps of concurrent generations into batched passes: one-token <c>Forward</c> calls made on
/// different threads at the same width run together as one <see cref="IAnyPrecisionEngine.ForwardBatch"/> of the inner
/// engine, so each linear reads its planes (and, at b ≥ 5 on AVX2, pays its table lookups) once for all of them instead
/// of once per sequence. Prompts and verify passes (several tokens) go straight to the inner engine. Each call returns
/// the logits it would have alone: the CPU engine's int8 products are exact integer sums whatever the batch, and its
/// attention runs per sequence, so batched greedy output is the solo output token for token (tests hold this).
/// </summary>
/// <remarks>
/// No scheduler thread: the first caller to find no batch running leads. It waits for a step from every sequence of its
/// width's last two passes that another thread steps and that is still alive (the generations that just got their
/// logits are sampling, or streaming, their next token), but no longer than <see cref="GatherWait"/> or a quarter of
/// the width's last pass (so a small model's short passes are not stretched by the wait), runs the batch on its own
/// thread, hands the lead to the oldest step still waiting, and returns. A lone generation waits only in the first two
/// passes after another at its width has ended. The inner engine stays the caller's.
/// </remarks>
public sealed class BatchingEngine : IAnyPrecisionEngine
{
    private readonly IAnyPrecisionEngine _inner;
    private readonly object _gate = new();
    private readonly List<Step> _waiting = [];
    private readonly long[] _lastPassTicks;
    /// <summary>Per width, the sequences of its last two passes (held weakly: a finished one's cache is not kept alive here), and its passes so far.</summary>
    private readonly List<Seen>[] _seen;
    private readonly long[] _passes;
    private bool _leading;
    private long _batches, _steps, _largest, _waits;

    /// <summary>Batches the one-token steps made concurrently on <paramref name="inner"/>, up to <paramref name="maxBatch"/> a pass.</summary>
    /// <param name="inner">The engine that runs the passes (kept open by the caller).</param>
    /// <param name="maxBatch">Most sequences in one pass; 1 runs every call on its own.</param>
    /// <param name="gatherWait">Longest a batch waits for the sequences of its width's last two passes to come back (default 1 ms; never more than a quarter of the last pass).</param>
    public BatchingEngine(IAnyPrecisionEngine inner, int maxBatch = 16, TimeSpan? gatherWait = null)
    {
        _inner = inner ?? throw new ArgumentNullException(nameof(inner));
        ArgumentOutOfRangeException.ThrowIfLessThan(maxBatch, 1);
        MaxBatch = maxBatch;
        GatherWait = gatherWait ?? TimeSpan.FromMilliseconds(1);
        if (GatherWait < TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(gatherWait), gatherWait, "the wait cannot be negative.");
        _lastPassTicks = new long[inner.ParentBits + 1];
        _seen = [.. Enumerable.Range(0, inner.ParentBits + 1).Select(_ => new List<Seen>())];
        _passes = new long[inner.ParentBits + 1];
    }

    /// <summary>Most sequences in one pass.</summary>
    public int MaxBatch { get; }
    /// <summary>Longest a batch waits for the sequences of its width's last two passes (never more than a quarter of the last pass).</summary>
    public TimeSpan GatherWait { get; }
    /// <summary>Steps waiting for a pass now.</summary>
    internal int Queued { get { lock (_gate) return _waiting.Count; } }

    /// <summary>Passes run for one-token steps so far.</summary>
    public long Batches { get { lock (_gate) return _batches; } }
    /// <summary>One-token steps run so far (over <see cref="Batches"/> passes).</summary>
    public long BatchedSteps { get { lock (_gate) return _steps; } }
    /// <summary>Most steps one pass has held.</summary>
    public long LargestBatch { get { lock (_gate) return _largest; } }
    /// <summary>Passes whose leader found fewer steps than it expected and waited for more.</summary>
    internal long Waits { get { lock (_gate) return _waits; } }

    /// <inheritdoc/>
    public LlamaConfig Config => _inner.Config;
    /// <inheritdoc/>
    public int SeedBits => _inner.SeedBits;
    /// <inheritdoc/>
    public int ParentBits => _inner.ParentBits;
    /// <inheritdoc/>
    public int Bits { get => _inner.Bits; set => _inner.Bits = value; }
    /// <inheritdoc/>
    public string Kernels => _inner.Kernels;
    /// <inheritdoc/>
    public KvCache CreateCache(int capacity = 0) => _inner.CreateCache(capacity);
    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => Forward(tokens, cache, logits, _inner.Bits);
    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, IReadOnlyList<int> widths) => _inner.Forward(tokens, cache, logits, widths);
    /// <inheritdoc/>
    public void ForwardBatch(ReadOnlySpan<int> tokens, IReadOnlyList<KvCache> caches, Span<float> logits, int bits) => _inner.ForwardBatch(tokens, caches, logits, bits);

    /// <summary>
    /// <inheritdoc/> A one-token step joins the next batch at <paramref name="bits"/> and returns when that batch has run;
    /// several tokens run at once on the inner engine.
    /// </summary>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int bits)
    {
        if (tokens.Length != 1 || MaxBatch == 1)
        {
            _inner.Forward(tokens, cache, logits, bits);
            return;
        }
        ForwardArguments.Check(Config, tokens, cache, logits);
        if (bits < SeedBits || bits > ParentBits) throw new ArgumentOutOfRangeException(nameof(bits), bits, $"the model serves {SeedBits}..{ParentBits} bits.");
        // The step's logits land in a pooled buffer of its own, copied out here once its batch has run: the leader never
        // writes into a caller's memory, even one that has stopped waiting.
        var step = new Step(tokens[0], cache, bits, ArrayPool<float>.Shared.Rent(Config.VocabSize));
        lock (_gate)
        {
            foreach (var other in _waiting)
                if (ReferenceEquals(other.Cache, cache)) throw new InvalidOperationException("this cache already has a step waiting: a sequence's steps run one at a time.");
            _waiting.Add(step);
            Monitor.PulseAll(_gate);
            if (!_leading) _leading = step.Leads = true;
            try
            {
                while (!step.Leads && !step.Done) Monitor.Wait(_gate);
            }
            catch
            {
                // Interrupted while waiting: leave the queue, and pass on a lead handed to this step, so the others go on.
                // (A step already taken into a running batch runs there; only its buffer is left to the collector.)
                if (_waiting.Remove(step) && step.Leads) HandOver();
                throw;
            }
        }
        if (!step.Done) Lead(step);
        step.Error?.Throw();
        step.Logits.AsSpan(0, Config.VocabSize).CopyTo(logits);
        ArrayPool<float>.Shared.Return(step.Logits);
    }

    /// <summary>Runs one batch holding <paramref name="own"/> (and the steps at its width waiting with it), then passes the lead on.</summary>
    private void Lead(Step own)
    {
        List<Step> batch;
        lock (_gate)
        {
            int want = Math.Min(MaxBatch, Expected(own));
            long wait = Math.Min((long)(GatherWait.TotalSeconds * Stopwatch.Frequency), _lastPassTicks[own.Bits] / 4);
            long until = Stopwatch.GetTimestamp() + wait;
            if (wait > 0 && Waiting(own.Bits) < want) _waits++;
            try
            {
                while (Waiting(own.Bits) < want)
                {
                    long left = until - Stopwatch.GetTimestamp();
                    if (left <= 0) break;
                    Monitor.Wait(_gate, TimeSpan.FromTicks(Math.Max(1, left * TimeSpan.TicksPerSecond / Stopwatch.Frequency)));
                }
            }
            catch
            {
                // Interrupted while gathering: leave the queue and pass the lead on, so the others go on.
                _waiting.Remove(own);
                HandOver();
                throw;
            }
            batch = [own];
            for (int i = 0; i < _waiting.Count && batch.Count < MaxBatch; i++)
                if (_waiting[i] != own && _waiting[i].Bits == own.Bits) batch.Add(_waiting[i]);
            foreach (var s in batch) _waiting.Remove(s);
        }
        long start = Stopwatch.GetTimestamp();
        try { Run(batch, own.Bits); }
        finally
        {
            long ticks = Stopwatch.GetTimestamp() - start;
            lock (_gate)
            {
                _batches++;
                _steps += batch.Count;
                _largest = Math.Max(_largest, batch.Count);
                _lastPassTicks[own.Bits] = ticks;
                Remember(batch, own.Bits);
                foreach (var s in batch) s.Done = true;
                HandOver();
            }
        }
    }

    /// <summary>Gives the lead to the oldest waiting step, or ends it when none waits (under the lock).</summary>
    private void HandOver()
    {
        if (_waiting.Count > 0) _waiting[0].Leads = true;
        else _leading = false;
        Monitor.PulseAll(_gate);
    }

    /// <summary>
    /// The sequences <paramref name="own"/>'s batch can expect (under the lock): its own, and every other of its width's
    /// last two passes that is still alive and stepped from another thread (a thread has at most one step waiting: its
    /// other sequences cannot come while it leads). This replaced waiting for as many steps as the width's last pass
    /// held: two generations out of step each found a pass of one before them, and ran alternate passes for good, each
    /// waiting out the other's (a server's step returns late, after streaming its token).
    /// </summary>
    private int Expected(Step own)
    {
        int n = 1;
        foreach (var seen in _seen[own.Bits])
            if (seen.Thread != own.Thread && seen.Cache.TryGetTarget(out var cache) && !ReferenceEquals(cache, own.Cache)) n++;
        return n;
    }

    /// <summary>Counts a pass at <paramref name="bits"/> and notes its sequences, forgetting those of older passes (under the lock).</summary>
    private void Remember(List<Step> batch, int bits)
    {
        long pass = ++_passes[bits];
        var seen = _seen[bits];
        seen.RemoveAll(x => x.Pass < pass - 1 || !x.Cache.TryGetTarget(out var cache) || batch.Exists(s => ReferenceEquals(s.Cache, cache)));
        foreach (var s in batch) seen.Add(new Seen(new WeakReference<KvCache>(s.Cache), s.Thread, pass));
    }

    /// <summary>A sequence of a recent pass: its cache (weakly), the thread that stepped it, and the pass.</summary>
    private readonly record struct Seen(WeakReference<KvCache> Cache, int Thread, long Pass);

    private int Waiting(int bits)
    {
        int n = 0;
        foreach (var s in _waiting) if (s.Bits == bits) n++;
        return n;
    }

    /// <summary>
    /// One pass over <paramref name="batch"/>, each step's logits into its buffer. When a pass of several steps fails, each
    /// step runs again alone, so a step that cannot run fails by itself and the others get their logits (a failed pass
    /// appends to no cache: the inner engine checks a batch whole before it runs, and rolls back what it ran otherwise).
    /// </summary>
    private void Run(List<Step> batch, int bits)
    {
        int vocab = Config.VocabSize;
        if (batch.Count > 1)
        {
            var tokens = new int[batch.Count];
            var caches = new KvCache[batch.Count];
            for (int i = 0; i < batch.Count; i++) (tokens[i], caches[i]) = (batch[i].Token, batch[i].Cache);
            var logits = ArrayPool<float>.Shared.Rent(batch.Count * vocab);
            try
            {
                _inner.ForwardBatch(tokens, caches, logits.AsSpan(0, batch.Count * vocab), bits);
                for (int i = 0; i < batch.Count; i++) logits.AsSpan(i * vocab, vocab).CopyTo(batch[i].Logits);
                return;
            }
            catch (Exception) { /* each step alone below */ }
            finally { ArrayPool<float>.Shared.Return(logits); }
        }
        foreach (var s in batch)
        {
            try { _inner.Forward([s.Token], s.Cache, s.Logits.AsSpan(0, vocab), bits); }
            catch (Exception e) { s.Error = ExceptionDispatchInfo.Capture(e); }
        }
    }

    /// <summary>Nothing to release: the inner engine is the caller's.</summary>
    public void Dispose() { }

    private sealed class Step(int token, KvCache cache, int bits, float[] logits)
    {
        public readonly int Token = token, Bits = bits, Thread = Environment.CurrentManagedThreadId;
        public readonly KvCache Cache = cache;
        public readonly float[] Logits = logits;
        public bool Leads, Done;
        public ExceptionDispatchInfo? Error;
    }
}
