using System.Numerics.Tensors;
using AnyPrecML.Generation;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

/// <summary>
/// Decode steps of several sequences in one pass (<see cref="IAnyPrecisionEngine.ForwardBatch"/>) and the batcher that
/// gathers concurrent generations' steps into such passes (<see cref="BatchingEngine"/>): each sequence must get exactly
/// what its own step gives, logits and cache, bit for bit.
/// </summary>
[TestClass]
public sealed class BatchedDecodeTests
{
    private static TestData.TempDir _dir = null!;
    private static AnyPrecisionModel _model = null!;

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(_dir["ap"]);
        _model = AnyPrecisionModel.Open(_dir["ap"]);
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        _model.Dispose();
        _dir.Dispose();
    }

    /// <summary>Prompts of 1, 6, 30 and 80 tokens (the last past CausalAttention.BlockedTokens: a blocked prefill).</summary>
    private static int[][] Prompts() =>
        [.. new[] { 1, 6, 30, 80 }.Select(n => (int[])[1, .. Enumerable.Range(0, n - 1).Select(i => (i * 37 + 11 * n) % 500 + 3)])];

    /// <summary>
    /// Four sequences at different lengths, twelve steps at widths 3, 5 and 8 in turn: one batched step against one step per
    /// sequence on a second set of caches fed alike. Logits and caches equal bit for bit with the int8 kernels (integer
    /// products whatever the batch; attention per sequence), and to fp32 rounding with the fp32 kernels, whose several-token
    /// products sum in another order.
    /// </summary>
    [TestMethod]
    [DataRow(KvCacheType.BFloat16, KernelAccuracy.Int8)]
    [DataRow(KvCacheType.Float32, KernelAccuracy.Int8)]
    [DataRow(KvCacheType.Float32, KernelAccuracy.Float32)]
    public void ABatchedStepGivesEverySequenceExactlyWhatItsOwnStepGives(KvCacheType cacheType, KernelAccuracy accuracy)
    {
        using var engine = new OnnxEngine(_model, new OnnxEngineOptions { KvCacheType = cacheType, Backend = new CpuBitplaneBackend(accuracy: accuracy) });
        Assert.IsTrue(engine.InPlaceAttention, "the CPU graph runs a batch as one pass");
        int vocab = _model.Config.VocabSize;
        var prompts = Prompts();
        int n = prompts.Length;
        var batched = new KvCache[n];
        var alone = new KvCache[n];
        var tokens = new int[n];
        for (int i = 0; i < n; i++)
        {
            batched[i] = engine.CreateCache();
            alone[i] = engine.CreateCache();
            if (prompts[i].Length > 1)
            {
                engine.Forward(prompts[i].AsSpan(0, prompts[i].Length - 1), batched[i], new float[vocab], 8);
                engine.Forward(prompts[i].AsSpan(0, prompts[i].Length - 1), alone[i], new float[vocab], 8);
            }
            tokens[i] = prompts[i][^1];
        }
        var logits = new float[n * vocab];
        var own = new float[vocab];
        int[] widths = [3, 5, 8];
        for (int step = 0; step < 12; step++)
        {
            int bits = widths[step % widths.Length];
            engine.ForwardBatch(tokens, batched, logits, bits);
            for (int i = 0; i < n; i++)
            {
                engine.Forward([tokens[i]], alone[i], own, bits);
                var row = logits.AsSpan(i * vocab, vocab);
                if (accuracy == KernelAccuracy.Int8) CollectionAssert.AreEqual(own, row.ToArray(), $"step {step}, sequence {i}, {bits} bits");
                else Assert.IsLessThan(2e-3, TestData.MaxAbsDiff(own, row), $"step {step}, sequence {i}, {bits} bits");
                Assert.AreEqual(alone[i].Length, batched[i].Length);
                tokens[i] = TensorPrimitives.IndexOfMax(own);
            }
        }
        for (int i = 0; i < n; i++)
        {
            Assert.AreEqual(prompts[i].Length - 1 + 12, batched[i].Length);
            var a = batched[i].Buffers;
            var b = alone[i].Buffers;
            for (int j = 0; j < a.Count; j++)
                if (accuracy == KernelAccuracy.Int8) CollectionAssert.AreEqual(b[j], a[j], $"sequence {i}, cache buffer {j}");
                else Assert.IsLessThan(2e-3, TestData.MaxAbsDiff(b[j], a[j]), $"sequence {i}, cache buffer {j}");
        }
    }

    /// <summary>A batch is checked whole before it runs: nothing is appended to any cache when one part is wrong.</summary>
    [TestMethod]
    public void ABadBatchIsRefusedBeforeAnyCacheChanges()
    {
        using var onnx = new OnnxEngine(_model);
        using var reference = new AnyPrecisionReferenceEngine(_model);
        foreach (IAnyPrecisionEngine engine in new IAnyPrecisionEngine[] { onnx, reference })
        {
            int vocab = engine.Config.VocabSize;
            var a = engine.CreateCache();
            var b = engine.CreateCache();
            var full = engine.CreateCache(2);
            engine.Forward([1, 5], full, new float[vocab]);
            string name = engine.GetType().Name;
            Assert.ThrowsExactly<ArgumentException>(() => engine.ForwardBatch([1, 2], [a, a], new float[2 * vocab], 4), name);
            Assert.ThrowsExactly<ArgumentException>(() => engine.ForwardBatch([1, 2], [a], new float[2 * vocab], 4), name);
            Assert.ThrowsExactly<ArgumentException>(() => engine.ForwardBatch([1, 2], [a, b], new float[vocab], 4), name);
            Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => engine.ForwardBatch([1, vocab], [a, b], new float[2 * vocab], 4), name);
            var error = Assert.ThrowsExactly<InvalidOperationException>(() => engine.ForwardBatch([1, 2], [a, full], new float[2 * vocab], 4), name);
            StringAssert.Contains(error.Message, "context full");
            Assert.AreEqual((0, 0, 2), (a.Length, b.Length, full.Length), name);
        }
        var foreign = reference.CreateCache();
        Assert.ThrowsExactly<ArgumentException>(() => onnx.ForwardBatch([1, 2], [onnx.CreateCache(), foreign], new float[2 * onnx.Config.VocabSize], 4));
    }

    /// <summary>
    /// Six generations at once through one batcher of at most 4 steps a pass, three at 3 bits and three at 8: each gives
    /// the tokens it gives alone, and the batcher ran steps together (the steps outnumber the passes) within its cap.
    /// </summary>
    [TestMethod]
    public void ConcurrentGenerationsShareDecodePassesAndKeepTheirOwnTokens()
    {
        using var engine = new OnnxEngine(_model);
        var batcher = new BatchingEngine(engine, maxBatch: 4);
        var tokenizer = LlamaTokenizerLoader.Load(_model.Checkpoint);
        string[] prompts = ["Once upon a time", "Lily and Tom", "The cat sat", "A big dog", "One day, a little girl", "Tim had a red ball"];
        int[] widths = [3, 8, 3, 8, 3, 8];
        var options = new GenerationOptions { MaxTokens = 40, StopAtEos = false };
        var expected = prompts.Select((p, i) => new TextGenerator(new WidthView(engine, widths[i]), tokenizer).GenerateTokens(p, options).Select(s => s.Id).ToList()).ToList();
        var actual = new List<int>[prompts.Length];
        using var start = new Barrier(prompts.Length);
        var threads = prompts.Select((p, i) => new Thread(() =>
        {
            start.SignalAndWait();
            actual[i] = new TextGenerator(new WidthView(batcher, widths[i]), tokenizer).GenerateTokens(p, options).Select(s => s.Id).ToList();
        })).ToList();
        threads.ForEach(t => t.Start());
        foreach (var t in threads) Assert.IsTrue(t.Join(TimeSpan.FromMinutes(2)), "a generation never finished: the batcher lost its lead");
        for (int i = 0; i < prompts.Length; i++) CollectionAssert.AreEqual(expected[i], actual[i], $"'{prompts[i]}' at {widths[i]} bits");
        // One-token steps: the prompt's last token and every generated token but the last (and a two-token prompt's first).
        long steps = prompts.Sum(p => 40L + (tokenizer.EncodeToIds(p).Count == 1 ? 1 : 0));
        Assert.AreEqual(steps, batcher.BatchedSteps);
        Assert.IsLessThan(batcher.BatchedSteps, batcher.Batches, "some passes ran several generations' steps");
        Assert.IsGreaterThanOrEqualTo(2L, batcher.LargestBatch);
        Assert.IsLessThanOrEqualTo(4L, batcher.LargestBatch);
    }

    /// <summary>
    /// Two generations at one width, the second starting after the first has stepped alone: each leader used to expect as
    /// many steps as its width's last pass held (one), so the two ran alternate passes for good, one step each, the one
    /// arriving during the other's pass waiting it out. The batcher now also expects every sequence that stepped at the
    /// width within its last two passes, and the two share their passes from the second's first step on.
    /// </summary>
    [TestMethod]
    public void TwoGenerationsStartedApartShareTheirPasses()
    {
        using var engine = new OnnxEngine(_model);
        var slow = new TestEngine(engine, TimeSpan.FromMilliseconds(20)) { EveryCallDelay = TimeSpan.FromMilliseconds(20) };
        var batcher = new BatchingEngine(slow, maxBatch: 4, gatherWait: TimeSpan.FromMilliseconds(5));
        var tokenizer = LlamaTokenizerLoader.Load(_model.Checkpoint);
        string[] prompts = ["Once upon a time", "Lily and Tom"];
        var options = new GenerationOptions { MaxTokens = 24, StopAtEos = false };
        var expected = prompts.Select(p => new TextGenerator(new WidthView(engine, 3), tokenizer).GenerateTokens(p, options).Select(s => s.Id).ToList()).ToList();
        var actual = new List<int>[prompts.Length];
        // Each step returns 3 ms after its pass (a server streaming its token): longer than a waiting leader takes to wake.
        var threads = prompts.Select((p, i) => new Thread(() =>
            actual[i] = new TextGenerator(new WidthView(batcher, 3, TimeSpan.FromMilliseconds(3)), tokenizer).GenerateTokens(p, options).Select(s => s.Id).ToList())).ToList();
        threads[0].Start();
        Assert.IsTrue(SpinWait.SpinUntil(() => batcher.BatchedSteps >= 1, TimeSpan.FromMinutes(1)), "the first generation never stepped");
        threads[1].Start();
        foreach (var t in threads) Assert.IsTrue(t.Join(TimeSpan.FromMinutes(2)), "a generation never finished");
        for (int i = 0; i < prompts.Length; i++) CollectionAssert.AreEqual(expected[i], actual[i], prompts[i]);
        double perPass = (double)batcher.BatchedSteps / batcher.Batches;
        Console.WriteLine($"{batcher.BatchedSteps} steps in {batcher.Batches} passes: {perPass:F2} a pass");
        Assert.IsGreaterThan(1.5, perPass, $"{batcher.BatchedSteps} steps in {batcher.Batches} passes: the generations alternated passes");
    }

    /// <summary>
    /// One thread stepping two sequences in turn at one width never waits: the other sequence of the last pass is its
    /// own, and cannot come while it leads (counting it, every step waited out the gather wait).
    /// </summary>
    [TestMethod]
    public void OneThreadSteppingTwoSequencesInTurnNeverWaits()
    {
        using var engine = new OnnxEngine(_model);
        var batcher = new BatchingEngine(engine, maxBatch: 4, gatherWait: TimeSpan.FromMilliseconds(50));
        var caches = new[] { batcher.CreateCache(32), batcher.CreateCache(32) };
        var logits = new float[engine.Config.VocabSize];
        for (int step = 0; step < 8; step++)
            foreach (var cache in caches) batcher.Forward([1 + step], cache, logits, 3);
        Assert.AreEqual(16L, batcher.BatchedSteps);
        Assert.AreEqual(0L, batcher.Waits, "a leader waited for a sequence only its own thread could step");
    }

    /// <summary>
    /// The batcher remembers the sequences of recent passes weakly: a finished sequence's cache is collected even when no
    /// pass comes after it (an idle server), as one stepped on the engine directly is.
    /// </summary>
    [TestMethod]
    public void AFinishedSequencesCacheIsNotKeptByAnIdleBatcher()
    {
        using var engine = new OnnxEngine(_model);
        var batcher = new BatchingEngine(engine, maxBatch: 4);
        var direct = StepTwice(engine);
        var batched = StepTwice(batcher);
        for (int i = 0; i < 3; i++) { GC.Collect(); GC.WaitForPendingFinalizers(); }
        Assert.IsFalse(direct.IsAlive, "the engine itself keeps a stepped cache: this test cannot tell");
        Assert.IsFalse(batched.IsAlive, "the idle batcher still holds the finished sequence's cache");

        [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.NoInlining)]
        static WeakReference StepTwice(IAnyPrecisionEngine engine)
        {
            var cache = engine.CreateCache(8);
            engine.Forward([1], cache, new float[engine.Config.VocabSize], 3);
            engine.Forward([5], cache, new float[engine.Config.VocabSize], 3);
            return new WeakReference(cache);
        }
    }

    /// <summary>A step that cannot run is refused on its own thread; the batcher keeps serving (a lone step never waits).</summary>
    [TestMethod]
    public void AStepThatCannotRunFailsAloneAndTheBatcherGoesOn()
    {
        using var engine = new OnnxEngine(_model);
        var batcher = new BatchingEngine(engine);
        int vocab = engine.Config.VocabSize;
        var full = batcher.CreateCache(1);
        batcher.Forward([1], full, new float[vocab], 4);
        Assert.ThrowsExactly<InvalidOperationException>(() => batcher.Forward([2], full, new float[vocab], 4));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => batcher.Forward([2], batcher.CreateCache(), new float[vocab], 9));
        var cache = batcher.CreateCache();
        var logits = new float[vocab];
        var expected = new float[vocab];
        batcher.Forward([1], cache, logits, 4);
        engine.Forward([1], engine.CreateCache(), expected, 4);
        CollectionAssert.AreEqual(expected, logits);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new BatchingEngine(engine, maxBatch: 0));
    }

    /// <summary>
    /// A step whose cache the engine refuses (an fp32 cache on a bf16 engine), in one pass with a good step: the pass fails,
    /// each step runs again alone, and only the bad one fails; the good one gets its own logits. A waiting step whose thread
    /// is interrupted leaves the queue, and the batcher goes on.
    /// </summary>
    [TestMethod]
    public void ABadStepFailsAloneAndAnInterruptedWaiterLeavesTheQueue()
    {
        using var engine = new OnnxEngine(_model);
        using var fp32 = new OnnxEngine(_model, new OnnxEngineOptions { KvCacheType = KvCacheType.Float32 });
        var gate = new TestEngine(engine, TimeSpan.Zero) { GateFirstCall = true };
        var batcher = new BatchingEngine(gate, gatherWait: TimeSpan.Zero);
        int vocab = engine.Config.VocabSize;
        float[] leader = new float[vocab], good = new float[vocab], expected = new float[vocab];
        Exception? bad = null, interrupted = null, failed = null;
        var goodCache = engine.CreateCache();
        var threads = new List<Thread>
        {
            new(() => batcher.Forward([1], engine.CreateCache(), leader, 4)),
        };
        threads[0].Start();
        Assert.IsTrue(gate.Entered.Wait(TimeSpan.FromMinutes(1)), "the leader reached the engine");
        // While the leader is held inside the engine, three steps queue: a good one, a bad one, and one to interrupt.
        threads.Add(new Thread(() => { try { batcher.Forward([1], goodCache, good, 4); } catch (Exception e) { failed = e; } }));
        threads.Add(new Thread(() => { try { batcher.Forward([1], fp32.CreateCache(), new float[vocab], 4); } catch (Exception e) { bad = e; } }));
        var waiter = new Thread(() => { try { batcher.Forward([1], engine.CreateCache(), new float[vocab], 3); } catch (Exception e) { interrupted = e; } });
        threads.Add(waiter);
        foreach (var t in threads.Skip(1)) t.Start();
        Assert.IsTrue(SpinWait.SpinUntil(() => batcher.Queued == 3, TimeSpan.FromMinutes(1)), "three steps queued behind the leader");
        waiter.Interrupt();
        Assert.IsTrue(waiter.Join(TimeSpan.FromMinutes(1)));
        Assert.IsInstanceOfType<ThreadInterruptedException>(interrupted);
        Assert.AreEqual(2, batcher.Queued, "the interrupted step left the queue");
        gate.Release.Set();
        foreach (var t in threads) Assert.IsTrue(t.Join(TimeSpan.FromMinutes(1)), "every step finished");
        Assert.IsNull(failed, "the good step must not fail with the bad one");
        Assert.AreEqual(2L, batcher.LargestBatch, "the good and the bad step ran as one pass first");
        Assert.IsInstanceOfType<ArgumentException>(bad);
        StringAssert.Contains(bad!.Message, "Float32");
        engine.Forward([1], engine.CreateCache(), expected, 4);
        CollectionAssert.AreEqual(expected, good, "the good step got its own logits");
        Assert.AreEqual(1, goodCache.Length);
        // The batcher still serves.
        var after = new float[vocab];
        var done = Task.Run(() => batcher.Forward([1], engine.CreateCache(), after, 4));
        Assert.IsTrue(done.Wait(TimeSpan.FromMinutes(1)), "the batcher kept a leader");
        CollectionAssert.AreEqual(expected, after);
    }

    /// <summary>
    /// A leader interrupted while it waits for the previous pass's sequences leaves the queue and hands on the lead: the
    /// next step still runs. (A slow engine makes the last pass long, so the gathering wait, a quarter of it, can be caught.)
    /// </summary>
    [TestMethod]
    public void ALeaderInterruptedWhileGatheringHandsOnTheLead()
    {
        using var engine = new OnnxEngine(_model);
        var slow = new TestEngine(engine, TimeSpan.FromSeconds(4));
        var batcher = new BatchingEngine(slow, gatherWait: TimeSpan.FromSeconds(10));
        int vocab = engine.Config.VocabSize;
        // One pass alone, then two steps that queued during it run as a pass of two (4 s): the next leader waits up to 1 s for two.
        var first = new Thread(() => batcher.Forward([1], engine.CreateCache(), new float[vocab], 4));
        first.Start();
        Assert.IsTrue(SpinWait.SpinUntil(() => slow.Calls == 1, TimeSpan.FromMinutes(1)));
        var pair = Enumerable.Range(0, 2).Select(_ => new Thread(() => batcher.Forward([1], engine.CreateCache(), new float[vocab], 4))).ToList();
        pair.ForEach(t => t.Start());
        foreach (var t in pair.Append(first)) Assert.IsTrue(t.Join(TimeSpan.FromMinutes(1)));
        Assert.AreEqual(2L, batcher.LargestBatch);
        Exception? interrupted = null;
        var lone = new Thread(() => { try { batcher.Forward([1], engine.CreateCache(), new float[vocab], 4); } catch (Exception e) { interrupted = e; } });
        lone.Start();
        Assert.IsTrue(SpinWait.SpinUntil(() => lone.ThreadState.HasFlag(ThreadState.WaitSleepJoin), TimeSpan.FromMinutes(1)), "the lone leader is gathering");
        lone.Interrupt();
        Assert.IsTrue(lone.Join(TimeSpan.FromMinutes(1)));
        Assert.IsInstanceOfType<ThreadInterruptedException>(interrupted);
        Assert.AreEqual(0, batcher.Queued);
        var next = Task.Run(() => batcher.Forward([1], engine.CreateCache(), new float[vocab], 4));
        Assert.IsTrue(next.Wait(TimeSpan.FromMinutes(1)), "the batcher kept a leader");
    }

    /// <summary>A cache in a forward pass refuses a second one (another thread, a batch), and serves again after it.</summary>
    [TestMethod]
    public void ACacheInAPassRefusesASecondPass()
    {
        using var engine = new OnnxEngine(_model);
        var cache = (OnnxKvCache)engine.CreateCache();
        int vocab = engine.Config.VocabSize;
        cache.Enter();
        Assert.ThrowsExactly<InvalidOperationException>(() => engine.Forward([1], cache, new float[vocab]));
        Assert.ThrowsExactly<InvalidOperationException>(() => engine.ForwardBatch([1, 1], [engine.CreateCache(), cache], new float[2 * vocab], 4));
        cache.Exit();
        Assert.AreEqual(0, cache.Length);
        engine.ForwardBatch([1, 1], [engine.CreateCache(), cache], new float[2 * vocab], 4);
        Assert.AreEqual(1, cache.Length);
    }

    /// <summary>The one-by-one fallback of ForwardBatch rolls back the sequences it ran when a later one fails.</summary>
    [TestMethod]
    public void TheOneByOneFallbackRollsBackWhenASequenceFails()
    {
        using var reference = new AnyPrecisionReferenceEngine(_model, 4);
        var failing = new TestEngine(reference, TimeSpan.Zero) { FailOnCall = 2 };
        int vocab = reference.Config.VocabSize;
        var caches = new[] { reference.CreateCache(), reference.CreateCache(), reference.CreateCache() };
        Assert.ThrowsExactly<InvalidOperationException>(() => ForwardArguments.ForwardEach(failing, [1, 1, 1], caches, new float[3 * vocab], 4));
        CollectionAssert.AreEqual(new[] { 0, 0, 0 }, caches.Select(c => c.Length).ToArray(), "no cache keeps the batch's token");
    }

    /// <summary>
    /// A real engine with hooks: its first call can wait inside until released (so steps queue behind the leader) or be
    /// slow, batched passes take <paramref name="delay"/> longer, and call <c>FailOnCall</c> throws.
    /// </summary>
    private sealed class TestEngine(IAnyPrecisionEngine inner, TimeSpan delay) : IAnyPrecisionEngine
    {
        public readonly ManualResetEventSlim Entered = new(), Release = new();
        private int _calls;
        public int Calls => Volatile.Read(ref _calls);
        public int FailOnCall { get; init; }
        /// <summary>The first call waits inside until <see cref="Release"/> is set.</summary>
        public bool GateFirstCall { get; init; }
        /// <summary>Every one-sequence call takes this much longer (a slow model's passes).</summary>
        public TimeSpan EveryCallDelay { get; init; }
        public LlamaConfig Config => inner.Config;
        public int SeedBits => inner.SeedBits;
        public int ParentBits => inner.ParentBits;
        public int Bits { get => inner.Bits; set => inner.Bits = value; }
        public KvCache CreateCache(int capacity = 0) => inner.CreateCache(capacity);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => Forward(tokens, cache, logits, inner.Bits);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, IReadOnlyList<int> widths) => inner.Forward(tokens, cache, logits, widths);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int bits)
        {
            int call = Interlocked.Increment(ref _calls);
            if (call == FailOnCall) throw new InvalidOperationException("a failing pass");
            if (call == 1 && GateFirstCall)
            {
                Entered.Set();
                Release.Wait();
            }
            if (call == 1) Thread.Sleep(delay / 2); // the first pass alone is slow too, so steps queue behind it
            if (EveryCallDelay > TimeSpan.Zero) Thread.Sleep(EveryCallDelay);
            inner.Forward(tokens, cache, logits, bits);
        }
        public void ForwardBatch(ReadOnlySpan<int> tokens, IReadOnlyList<KvCache> caches, Span<float> logits, int bits)
        {
            Thread.Sleep(delay);
            inner.ForwardBatch(tokens, caches, logits, bits);
        }
        public void Dispose() { }
    }


    /// <summary>
    /// An engine fixed at one width over another (as the chat client's views): TextGenerator then runs that width. With
    /// <paramref name="pause"/>, each call returns that much later, as a server's step does after it streams its token.
    /// </summary>
    private sealed class WidthView(IAnyPrecisionEngine inner, int bits, TimeSpan pause = default) : IInferenceEngine
    {
        public LlamaConfig Config => inner.Config;
        public KvCache CreateCache(int capacity = 0) => inner.CreateCache(capacity);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits)
        {
            inner.Forward(tokens, cache, logits, bits);
            if (pause > TimeSpan.Zero) Thread.Sleep(pause);
        }
        public void Dispose() { }
    }
}
