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
        using (var source = LlamaCheckpoint.Open(TestData.Stories260K))
            AnyPrecisionQuantizer.Quantize(source, _dir["ap"], new UniformSensitivity(), new QuantizerOptions { SeedBits = 3, ParentBits = 4 });
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

    /// <summary>The same prompt again reuses all of it but its last token, even past the blocked products' threshold.</summary>
    [TestMethod]
    public void ARepeatedPromptReusesAllButItsLastTokenAndGivesTheSameTokens()
    {
        var cache = new PromptCache(2);
        var cached = new TextGenerator(_engine, _tokenizer) { PromptCache = cache };
        string prompt = string.Join(" ", Enumerable.Repeat("Once upon a time, there was a little girl named Lily.", 6));
        int length = PromptLength(prompt);
        Assert.IsGreaterThan(Kernels.CausalAttention.BlockedTokens, length, "a prompt whose prefill takes the blocked products");
        var first = Run(cached, prompt);
        var second = Run(cached, prompt);
        CollectionAssert.AreEqual(first.Ids, second.Ids);
        CollectionAssert.AreEqual(Run(new TextGenerator(_engine, _tokenizer), prompt).Ids, second.Ids);
        Assert.AreEqual((1L, (long)length - 1), (cache.Hits, cache.ReusedTokens));
    }

    /// <summary>
    /// A kept cache too small for the next generation has its shared positions copied into a larger one (a chat's history
    /// outgrows the last turn's cache), with the tokens a fresh run gives; past MaxEntries the least recently used goes.
    /// </summary>
    [TestMethod]
    public void ACacheWithoutRoomIsCopiedIntoALargerOneAndTheOldestEntryGoes()
    {
        var cache = new PromptCache(2);
        var cached = new TextGenerator(_engine, _tokenizer) { PromptCache = cache };
        Run(cached, "The cat sat", Greedy with { MaxTokens = 4 });
        var longer = Run(cached, "The cat sat", Greedy with { MaxTokens = 40 });
        Assert.AreEqual((1L, (long)PromptLength("The cat sat") - 1), (cache.Hits, cache.ReusedTokens), "the 4-token cache lacked room for 40 tokens: copied");
        CollectionAssert.AreEqual(Run(new TextGenerator(_engine, _tokenizer), "The cat sat", Greedy with { MaxTokens = 40 }).Ids, longer.Ids);
        Assert.AreEqual(1, cache.Count, "the copy was kept, the small cache dropped");
        Run(cached, "A big dog");
        Run(cached, "Tim had a red ball");
        Assert.AreEqual(2, cache.Count, "three kept, the oldest dropped");
        Assert.AreEqual(1L, cache.Hits, "prompts sharing only BOS take no kept cache");
        Run(cached, "The cat sat");
        Assert.AreEqual(1L, cache.Hits, "'The cat sat' was the least recently used: gone");
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
            original.CopyTo(larger);
            Assert.AreEqual(7, larger.Length);
            float[] a = new float[vocab], b = new float[vocab];
            engine.Forward([52], original, a);
            engine.Forward([52], larger, b);
            CollectionAssert.AreEqual(a, b, engine.GetType().Name);
            Assert.ThrowsExactly<ArgumentException>(() => original.CopyTo(engine.CreateCache(4)), "no room");
            Assert.ThrowsExactly<ArgumentException>(() => original.CopyTo(larger), "not empty");
        }
        Assert.ThrowsExactly<ArgumentException>(() => _engine.CreateCache(8).CopyTo(reference.CreateCache(8)), "another engine's cache");
    }
}
