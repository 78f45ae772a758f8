using AnyPrecML.Generation;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Tests;

/// <summary>
/// <see cref="PromptCache"/>: a prompt that starts with tokens a kept cache holds prefills only the rest, and the tokens
/// come out as a generator without a cache gives them (bit for bit with the int8 kernels, for prompts repeated exactly and
/// for prompts shorter than CausalAttention.BlockedTokens).
/// </summary>
[TestClass]
public sealed class PromptCacheTests
{
    private static TestData.TempDir _dir = null!;
    private static AnyPrecisionModel _model = null!;
    private static OnnxEngine _engine = null!;
    private static Tokenizer _tokenizer = null!;

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(_dir["ap"], new QuantizerOptions { SeedBits = 3, ParentBits = 4 });
        _model = AnyPrecisionModel.Open(_dir["ap"]);
        _engine = new OnnxEngine(_model, new OnnxEngineOptions { Bits = 4 });
        _tokenizer = LlamaTokenizerLoader.Load(_model.Checkpoint);
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        _engine.Dispose();
        _model.Dispose();
        _dir.Dispose();
    }

    private static readonly GenerationOptions Greedy = new() { MaxTokens = 24, StopAtEos = false };

    private static (List<int> Ids, string Text) Run(TextGenerator generator, string prompt, GenerationOptions? options = null)
    {
        var steps = generator.GenerateTokens(prompt, options ?? Greedy).ToList();
        return (steps.Select(s => s.Id).ToList(), string.Concat(steps.Select(s => s.Text)));
    }

    private static int PromptLength(string prompt) => _tokenizer.EncodeToIds(prompt).Count + (_tokenizer.EncodeToIds(prompt) is [1, ..] ? 0 : 1);

    /// <summary>A chat's turns: each next prompt holds the last prompt and its completion, and reuses their keys and values.</summary>
    [TestMethod]
    public void ANextTurnPrefillsOnlyItsNewTokensAndGivesWhatAFreshRunGives()
    {
        var cache = new PromptCache(4);
        var cached = new TextGenerator(_engine, _tokenizer) { PromptCache = cache };
        var fresh = new TextGenerator(_engine, _tokenizer);
        string conversation = "Lily and Tom";
        long reused = 0;
        int longest = 0;
        for (int turn = 0; turn < 3; turn++)
        {
            longest = Math.Max(longest, PromptLength(conversation));
            var expected = Run(fresh, conversation);
            var actual = Run(cached, conversation);
            CollectionAssert.AreEqual(expected.Ids, actual.Ids, $"turn {turn}");
            Assert.AreEqual(1, cache.Count, "the one conversation's cache is kept");
            if (turn > 0)
            {
                Assert.AreEqual(turn, cache.Hits);
                // The last turn's prompt and completion, re-tokenised, share all but their last token or two.
                int previous = PromptLength(conversation[..conversation.LastIndexOf(" Then", StringComparison.Ordinal)]);
                Assert.IsGreaterThanOrEqualTo(reused + previous - 2, cache.ReusedTokens, $"turn {turn}");
            }
            else Assert.AreEqual(0, cache.Hits);
            reused = cache.ReusedTokens;
            conversation += actual.Text + " Then";
        }
        Assert.IsLessThan(Kernels.CausalAttention.BlockedTokens, longest, "short prompts: every path attends token by token");
    }

    /// <summary>The same long prompt again reuses all of it but its last token (stories260K's 8-wide heads never take the blocked products).</summary>
    [TestMethod]
    public void ARepeatedPromptReusesAllButItsLastTokenAndGivesTheSameTokens()
    {
        var cache = new PromptCache(2);
        var cached = new TextGenerator(_engine, _tokenizer) { PromptCache = cache };
        string prompt = string.Join(" ", Enumerable.Repeat("Once upon a time, there was a little girl named Lily.", 6));
        int length = PromptLength(prompt);
        Assert.IsGreaterThan(Kernels.CausalAttention.BlockedTokens, length, "a prompt past the blocked products' length");
        var first = Run(cached, prompt);
        var second = Run(cached, prompt);
        CollectionAssert.AreEqual(first.Ids, second.Ids);
        CollectionAssert.AreEqual(Run(new TextGenerator(_engine, _tokenizer), prompt).Ids, second.Ids);
        Assert.AreEqual((1L, (long)length - 1), (cache.Hits, cache.ReusedTokens));
    }

    /// <summary>
    /// A prompt that parts from a kept cache midway (the same prompt again, another reply) gets a copy of the shared
    /// positions and leaves the kept cache in place; one that continues a kept cache whole takes it, copied into a larger
    /// one when it lacks room; past MaxEntries the least recently used goes.
    /// </summary>
    [TestMethod]
    public void CachesArePartedByCopyTakenWholeOrMovedToALargerOne()
    {
        var cache = new PromptCache(2);
        var cached = new TextGenerator(_engine, _tokenizer) { PromptCache = cache };
        Run(cached, "The cat sat", Greedy with { MaxTokens = 4 });
        var again = Run(cached, "The cat sat", Greedy with { MaxTokens = 40 });
        Assert.AreEqual((1L, (long)PromptLength("The cat sat") - 1), (cache.Hits, cache.ReusedTokens));
        CollectionAssert.AreEqual(Run(new TextGenerator(_engine, _tokenizer), "The cat sat", Greedy with { MaxTokens = 40 }).Ids, again.Ids);
        Assert.AreEqual(2, cache.Count, "the first run's cache stayed; the second's joined it");
        Run(cached, "A big dog");
        Run(cached, "Tim had a red ball");
        Assert.AreEqual(2, cache.Count, "four kept, the oldest two dropped");
        Assert.AreEqual(1L, cache.Hits, "prompts sharing only BOS take no kept cache");
        cache.Clear();

        // Taken whole, and moved to a larger cache when the next generation needs more room than it has.
        int[] tokens = [1, 403, 407, 261, 378, 30];
        var kept = _engine.CreateCache(8);
        _engine.Forward(tokens, kept, new float[_engine.Config.VocabSize]);
        cache.Return(kept, tokens);
        var (taken, reused) = cache.Take([.. tokens, 52, 41], 8, _engine.CreateCache)!.Value;
        Assert.AreSame(kept, taken);
        Assert.AreEqual((6, 0), (reused, cache.Count));
        cache.Return(taken, tokens);
        var (moved, again6) = cache.Take([.. tokens, 52, 41], 100, _engine.CreateCache)!.Value;
        Assert.AreNotSame(kept, moved);
        Assert.AreEqual((6, 6, 0), (again6, moved.Length, cache.Count));
        Assert.IsGreaterThanOrEqualTo(100, moved.Capacity);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new PromptCache(0));
    }

    /// <summary>A cache copied into a larger one continues exactly as the original (both engines; the layouts differ by capacity).</summary>
    [TestMethod]
    public void ACopiedCacheContinuesExactlyAsTheOriginal()
    {
        using var reference = new AnyPrecisionReferenceEngine(_model, 4);
        foreach (IAnyPrecisionEngine engine in new IAnyPrecisionEngine[] { _engine, reference })
        {
            int vocab = engine.Config.VocabSize;
            var original = engine.CreateCache(12);
            engine.Forward([1, 403, 407, 261, 378, 30, 41], original, new float[vocab]);
            var larger = engine.CreateCache(40);
            original.CopyTo(larger, 7);
            Assert.AreEqual(7, larger.Length);
            // The first 5 positions only: continuing it at position 5 equals a cache fed those 5 tokens alone.
            var start = engine.CreateCache(30);
            original.CopyTo(start, 5);
            var five = engine.CreateCache(12);
            engine.Forward([1, 403, 407, 261, 378], five, new float[vocab]);
            float[] a = new float[vocab], b = new float[vocab], c = new float[vocab], d = new float[vocab];
            engine.Forward([52], original, a);
            engine.Forward([52], larger, b);
            CollectionAssert.AreEqual(a, b, engine.GetType().Name);
            engine.Forward([52], start, c);
            engine.Forward([52], five, d);
            CollectionAssert.AreEqual(d, c, engine.GetType().Name);
            Assert.ThrowsExactly<ArgumentException>(() => original.CopyTo(engine.CreateCache(4), 8), "no room");
            Assert.ThrowsExactly<ArgumentException>(() => original.CopyTo(larger, 8), "not empty");
            Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => original.CopyTo(engine.CreateCache(40), 9), "more than it holds");
        }
        Assert.ThrowsExactly<ArgumentException>(() => _engine.CreateCache(8).CopyTo(reference.CreateCache(8), 0), "another engine's cache");
    }

    /// <summary>
    /// Two conversations after the same long system prompt, turns interleaved: the second starts from a copy of the first's
    /// shared start and leaves the first's cache whole, so each next turn reuses its own history.
    /// </summary>
    [TestMethod]
    public void InterleavedConversationsKeepTheirOwnHistories()
    {
        var cache = new PromptCache(4);
        var cached = new TextGenerator(_engine, _tokenizer) { PromptCache = cache };
        string system = "Once upon a time, there was a little girl named Lily. She loved to play outside. ";
        string a = system + "One day Lily", b = system + "Tom had a red ball";
        var a1 = Run(cached, a);
        var b1 = Run(cached, b);
        Assert.AreEqual(2, cache.Count, "B copied the shared start and left A's cache in place");
        Assert.IsGreaterThanOrEqualTo(PromptLength(system) - 2L, cache.ReusedTokens, "B reused the system prompt");
        long before = cache.ReusedTokens;
        a += a1.Text + " Then";
        var fresh = new TextGenerator(_engine, _tokenizer);
        CollectionAssert.AreEqual(Run(fresh, a).Ids, Run(cached, a).Ids);
        Assert.IsGreaterThanOrEqualTo(before + PromptLength(system + "One day Lily") - 2, cache.ReusedTokens, "A's second turn reused A's whole first turn");
        b += b1.Text + " Then";
        before = cache.ReusedTokens;
        CollectionAssert.AreEqual(Run(fresh, b).Ids, Run(cached, b).Ids);
        Assert.IsGreaterThanOrEqualTo(before + PromptLength(system + "Tom had a red ball") - 2, cache.ReusedTokens, "so did B's");
    }

    /// <summary>A generation whose forward pass fails keeps nothing: its cache may hold a half-written position.</summary>
    [TestMethod]
    public void AGenerationThatFailsMidwayKeepsNoCache()
    {
        var cache = new PromptCache(2);
        var failing = new TextGenerator(new FailingEngine(_engine, failOnCall: 5), _tokenizer) { PromptCache = cache };
        Assert.ThrowsExactly<InvalidOperationException>(() => Run(failing, "The cat sat"));
        Assert.AreEqual(0, cache.Count);
        Run(new TextGenerator(_engine, _tokenizer) { PromptCache = cache }, "The cat sat");
        Assert.AreEqual(1, cache.Count, "a generation that ends well keeps its cache");
    }

    /// <summary>An engine whose forward call number <paramref name="failOnCall"/> throws.</summary>
    private sealed class FailingEngine(IInferenceEngine inner, int failOnCall) : IInferenceEngine
    {
        private int _calls;
        public LlamaConfig Config => inner.Config;
        public KvCache CreateCache(int capacity = 0) => inner.CreateCache(capacity);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits)
        {
            if (++_calls == failOnCall) throw new InvalidOperationException("a failing pass");
            inner.Forward(tokens, cache, logits);
        }
        public void Dispose() { }
    }
}
