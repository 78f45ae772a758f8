namespace AnyPrecML.Models;

/// <summary>
/// The one seam every engine implements (the reference engine, the any-precision ONNX engine):
/// generation, perplexity, ML.NET and the CLI call only this.
/// </summary>
public interface IInferenceEngine : IDisposable
{
    /// <summary>The model's configuration.</summary>
    LlamaConfig Config { get; }

    /// <summary>A new, empty KV cache for up to <paramref name="capacity"/> positions (default: the model's context).</summary>
    KvCache CreateCache(int capacity = 0);

    /// <summary>
    /// Runs <paramref name="tokens"/> at positions cache.Length.. (prefill when several, decode when one),
    /// appends their keys and values to <paramref name="cache"/>, and writes logits to <paramref name="logits"/>:
    /// for every token ([tokens.Length, vocab]) or, when it holds one row, for the last token only.
    /// </summary>
    void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits);
}

/// <summary>
/// An engine over an any-precision model: it serves every width seed..parent from one copy of the weights, the width
/// chosen per call, so a draft and a target (self-speculative decoding) share the engine and the weights.
/// </summary>
public interface IAnyPrecisionEngine : IInferenceEngine
{
    /// <summary>Narrowest width served.</summary>
    int SeedBits { get; }
    /// <summary>Parent width: the widest served.</summary>
    int ParentBits { get; }
    /// <summary>Width that <see cref="IInferenceEngine.Forward"/> runs at (seed..parent).</summary>
    int Bits { get; set; }
    /// <summary>What runs the products, in words: the kernels' path, instruction set and arithmetic (logs, benchmark tables, the router's cost fingerprint).</summary>
    string Kernels => GetType().Name;
    /// <summary><see cref="IInferenceEngine.Forward"/> at width <paramref name="bits"/> (seed..parent), whatever <see cref="Bits"/> is.</summary>
    void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int bits);
    /// <summary>
    /// <see cref="IInferenceEngine.Forward"/> with one width per quantized linear (a precision profile's widths, in the
    /// model's linear order: layer-major, parts in <see cref="LlamaTensorNames.BlockLinears"/> order), each in seed..parent.
    /// </summary>
    void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, IReadOnlyList<int> widths);
    /// <summary>
    /// One decode step of several sequences at width <paramref name="bits"/>: <paramref name="tokens"/>[i] is appended to
    /// <paramref name="caches"/>[i] (distinct caches, each at its own length) and row i of <paramref name="logits"/>
    /// ([tokens.Length, vocab]) is its next-token logits, as <see cref="Forward(ReadOnlySpan{int}, KvCache, Span{float}, int)"/>
    /// of that one token would give. An engine that can runs them in one pass, so every linear reads its planes once for
    /// all of them (<see cref="Generation.BatchingEngine"/> gathers concurrent generations' steps into such calls); this
    /// default runs them one after another.
    /// </summary>
    void ForwardBatch(ReadOnlySpan<int> tokens, IReadOnlyList<KvCache> caches, Span<float> logits, int bits) => ForwardArguments.ForwardEach(this, tokens, caches, logits, bits);
}

/// <summary>What a key/value cache stores its keys and values as.</summary>
public enum KvCacheType
{
    /// <summary>fp32: the keys and values exactly as the layer computed them.</summary>
    Float32,
    /// <summary>
    /// bfloat16 (rounded to nearest even): half the memory and half the bytes each step reads. Models trained and served
    /// in bf16 keep their cache in it; fp32's exponent range, so no value overflows.
    /// </summary>
    BFloat16,
}

/// <summary>An engine's key/value cache: the positions already processed for one sequence.</summary>
public abstract class KvCache
{
    /// <summary>Positions the cache can hold.</summary>
    public abstract int Capacity { get; }
    /// <summary>Positions already in the cache (the next token's position).</summary>
    public int Length { get; protected set; }
    /// <summary>Empties the cache for reuse.</summary>
    public void Reset() => Truncate(0);

    /// <summary>
    /// Rolls the cache back to its first <paramref name="length"/> positions (rejected speculative tokens): the
    /// positions dropped are zeroed, so the cache is exactly what it was before they were appended.
    /// </summary>
    public void Truncate(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, Length);
        Erase(length, Length);
        Length = length;
    }

    /// <summary>Zeroes the keys and values of positions <paramref name="from"/>..<paramref name="to"/> (exclusive) in every layer.</summary>
    protected abstract void Erase(int from, int to);

    /// <summary>
    /// Copies this cache's first <paramref name="count"/> positions into <paramref name="destination"/>, an empty cache of the
    /// same engine with room for them (a kept prompt's cache moved to a larger one, or its start shared with another
    /// conversation: <see cref="Generation.PromptCache"/>).
    /// </summary>
    internal void CopyTo(KvCache destination, int count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(count, Length);
        if (destination.GetType() != GetType()) throw new ArgumentException("the caches come from different engines.", nameof(destination));
        if (destination.Length != 0 || destination.Capacity < count) throw new ArgumentException($"the destination must be empty with room for {count} positions.", nameof(destination));
        CopyPositions(destination, count);
        destination.Length = count;
    }

    /// <summary>Copies positions 0..<paramref name="count"/> of every layer into <paramref name="destination"/> (same type, checked).</summary>
    private protected abstract void CopyPositions(KvCache destination, int count);

    /// <summary>The raw key and value buffers, whole capacity (for tests comparing caches).</summary>
    internal abstract IReadOnlyList<float[]> Buffers { get; }
}

/// <summary>The argument checks every <see cref="IInferenceEngine.Forward"/> makes, in one place.</summary>
public static class ForwardArguments
{
    /// <summary>
    /// Throws unless <paramref name="tokens"/> are non-empty ids inside the vocabulary, <paramref name="cache"/> has room
    /// for them, and <paramref name="logits"/> holds one row or one per token; returns whether it holds one per token.
    /// </summary>
    public static bool Check(LlamaConfig config, ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits)
    {
        int n = tokens.Length, vocab = config.VocabSize;
        if (n == 0) throw new ArgumentException("no tokens to run.", nameof(tokens));
        if (cache.Length + n > cache.Capacity) throw new InvalidOperationException($"context full: {cache.Length} cached + {n} new positions exceed the cache's {cache.Capacity}.");
        bool allLogits = logits.Length == (long)n * vocab;
        if (!allLogits && logits.Length != vocab) throw new ArgumentException($"logits must hold {vocab} (last token) or {(long)n * vocab} (every token) floats, not {logits.Length}.", nameof(logits));
        foreach (int id in tokens)
            if ((uint)id >= (uint)vocab) throw new ArgumentOutOfRangeException(nameof(tokens), $"token id {id} is outside the vocabulary of {vocab}.");
        return allLogits;
    }

    /// <summary>
    /// Throws unless <paramref name="caches"/> are as many as <paramref name="tokens"/> (at least one) and distinct, each with
    /// room for one more position, the ids are inside the vocabulary, and <paramref name="logits"/> holds one row per sequence.
    /// </summary>
    public static void CheckBatch(LlamaConfig config, ReadOnlySpan<int> tokens, IReadOnlyList<KvCache> caches, Span<float> logits)
    {
        ArgumentNullException.ThrowIfNull(caches);
        int n = tokens.Length, vocab = config.VocabSize;
        if (n == 0) throw new ArgumentException("no sequences to run.", nameof(tokens));
        if (caches.Count != n) throw new ArgumentException($"{n} tokens but {caches.Count} caches: one token per sequence.", nameof(caches));
        if (logits.Length != (long)n * vocab) throw new ArgumentException($"logits must hold {(long)n * vocab} floats ({n} sequences × {vocab}), not {logits.Length}.", nameof(logits));
        var seen = new HashSet<KvCache>(ReferenceEqualityComparer.Instance);
        for (int i = 0; i < n; i++)
        {
            var cache = caches[i] ?? throw new ArgumentNullException(nameof(caches), $"cache {i} is null.");
            if (!seen.Add(cache)) throw new ArgumentException($"cache {i} appears twice: each sequence of a batch has its own cache.", nameof(caches));
            if (cache.Length + 1 > cache.Capacity) throw new InvalidOperationException($"context full: sequence {i}'s cache holds {cache.Length} of {cache.Capacity} positions.");
            if ((uint)tokens[i] >= (uint)vocab) throw new ArgumentOutOfRangeException(nameof(tokens), $"token id {tokens[i]} is outside the vocabulary of {vocab}.");
        }
    }

    /// <summary>
    /// <see cref="IAnyPrecisionEngine.ForwardBatch"/> as one <c>Forward</c> per sequence (engines without a batched pass). When
    /// one fails, the sequences already run are rolled back, so the batch appends to every cache or to none.
    /// </summary>
    public static void ForwardEach(IAnyPrecisionEngine engine, ReadOnlySpan<int> tokens, IReadOnlyList<KvCache> caches, Span<float> logits, int bits)
    {
        CheckBatch(engine.Config, tokens, caches, logits);
        int vocab = engine.Config.VocabSize, i = 0;
        try
        {
            for (; i < tokens.Length; i++) engine.Forward(tokens.Slice(i, 1), caches[i], logits.Slice(i * vocab, vocab), bits);
        }
        catch
        {
            for (int j = 0; j < i; j++) caches[j].Truncate(caches[j].Length - 1);
            throw;
        }
    }
}
