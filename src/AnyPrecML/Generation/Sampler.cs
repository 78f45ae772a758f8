using System.Numerics.Tensors;

namespace AnyPrecML.Generation;

/// <summary>Settings of text generation.</summary>
public sealed record GenerationOptions
{
    /// <summary>Most tokens to generate (the prompt not counted).</summary>
    public int MaxTokens { get; init; } = 256;
    /// <summary>0 for greedy decoding; otherwise logits are divided by it before sampling.</summary>
    public float Temperature { get; init; } = 0f;
    /// <summary>Sample only among the k most likely tokens (0: no limit).</summary>
    public int TopK { get; init; } = 0;
    /// <summary>Sample only among the most likely tokens whose probabilities add up to p (1: no limit).</summary>
    public float TopP { get; init; } = 1f;
    /// <summary>Seed of the sampler; the same seed gives the same text. Null picks one at random.</summary>
    public ulong? Seed { get; init; }
    /// <summary>Stop when the model emits end-of-sequence.</summary>
    public bool StopAtEos { get; init; } = true;

    /// <summary>Throws <see cref="ArgumentOutOfRangeException"/> for settings out of range.</summary>
    public GenerationOptions Validated()
    {
        if (MaxTokens < 0) throw new ArgumentOutOfRangeException(nameof(MaxTokens), MaxTokens, "max tokens must be 0 or more.");
        if (!(Temperature >= 0) || float.IsInfinity(Temperature)) throw new ArgumentOutOfRangeException(nameof(Temperature), Temperature, "temperature must be 0 (greedy) or positive.");
        if (TopK < 0) throw new ArgumentOutOfRangeException(nameof(TopK), TopK, "top-k must be 0 (off) or positive.");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentOutOfRangeException(nameof(TopP), TopP, "top-p must be in (0, 1].");
        return this;
    }
}

/// <summary>
/// Picks the next token from logits: greedy (argmax) at temperature 0, else temperature, top-k and
/// top-p (nucleus) sampling from a seeded xorshift64* generator, so a seed fixes the text on every
/// platform and runtime.
/// </summary>
public sealed class Sampler
{
    private readonly GenerationOptions _o;
    private ulong _state;
    private float[] _probs = [];
    private int[] _order = [];

    /// <summary>A sampler for <paramref name="options"/>.</summary>
    public Sampler(GenerationOptions options)
    {
        _o = options.Validated();
        _state = options.Seed ?? (ulong)Random.Shared.NextInt64();
        if (_state == 0) _state = 0x9E3779B97F4A7C15; // xorshift has no zero state
    }

    /// <summary>The next token for <paramref name="logits"/> (one row of the vocabulary).</summary>
    public int Next(ReadOnlySpan<float> logits)
    {
        if (_o.Temperature == 0 || _o.TopK == 1) return TensorPrimitives.IndexOfMax(logits);
        int n = logits.Length;
        if (_probs.Length != n) { _probs = new float[n]; _order = new int[n]; }
        TensorPrimitives.Divide(logits, _o.Temperature, _probs);
        TensorPrimitives.SoftMax(_probs, _probs);

        // Candidates by descending probability, cut by top-k then top-p, then renormalized by the draw.
        for (int i = 0; i < n; i++) _order[i] = i;
        var probs = _probs;
        Array.Sort(_order, (a, b) => probs[b].CompareTo(probs[a]));
        int keep = _o.TopK > 0 ? Math.Min(_o.TopK, n) : n;
        if (_o.TopP < 1)
        {
            float cumulative = 0;
            for (int i = 0; i < keep; i++)
            {
                cumulative += probs[_order[i]];
                if (cumulative >= _o.TopP) { keep = i + 1; break; }
            }
        }
        float total = 0;
        for (int i = 0; i < keep; i++) total += probs[_order[i]];
        float r = NextFloat() * total, acc = 0;
        for (int i = 0; i < keep; i++)
        {
            acc += probs[_order[i]];
            if (r < acc) return _order[i];
        }
        return _order[keep - 1]; // rounding: the draw fell past the last partial sum
    }

    /// <summary>A uniform float in [0, 1).</summary>
    private float NextFloat()
    {
        _state ^= _state >> 12;
        _state ^= _state << 25;
        _state ^= _state >> 27;
        return ((_state * 0x2545F4914F6CDD1DUL) >> 40) / 16777216f;
    }
}
