using System.Numerics.Tensors;
using AnyPrecML.Kernels;

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
    /// <summary>
    /// Draft width for self-speculative decoding (below the engine's width, which is the target), or null for
    /// target-only decoding. Needs an <see cref="Models.IAnyPrecisionEngine"/>.
    /// </summary>
    public int? DraftBits { get; init; }
    /// <summary>Most tokens the draft proposes per round (k), 1..<see cref="MaxDraftTokens"/>.</summary>
    public int DraftTokens { get; init; } = 4;

    /// <summary>
    /// Largest <see cref="DraftTokens"/>. A verification pass (k + 1 tokens) then stays below
    /// <see cref="Kernels.CausalAttention.BlockedTokens"/>, so it attends token by token exactly as decode steps do.
    /// </summary>
    public const int MaxDraftTokens = 64;
    /// <summary>Adaptive draft length: a round stops drafting when the draft's top probability falls under this (0: always k).</summary>
    public float DraftThreshold { get; init; }

    /// <summary>Throws <see cref="ArgumentOutOfRangeException"/> for settings out of range.</summary>
    public GenerationOptions Validated()
    {
        if (MaxTokens < 0) throw new ArgumentOutOfRangeException(nameof(MaxTokens), MaxTokens, "max tokens must be 0 or more.");
        if (!(Temperature >= 0) || float.IsInfinity(Temperature)) throw new ArgumentOutOfRangeException(nameof(Temperature), Temperature, "temperature must be 0 (greedy) or positive.");
        if (TopK < 0) throw new ArgumentOutOfRangeException(nameof(TopK), TopK, "top-k must be 0 (off) or positive.");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentOutOfRangeException(nameof(TopP), TopP, "top-p must be in (0, 1].");
        if (DraftTokens is < 1 or > MaxDraftTokens) throw new ArgumentOutOfRangeException(nameof(DraftTokens), DraftTokens, $"draft tokens must be in 1..{MaxDraftTokens}.");
        if (!(DraftThreshold >= 0 && DraftThreshold < 1)) throw new ArgumentOutOfRangeException(nameof(DraftThreshold), DraftThreshold, "the draft threshold must be in [0, 1).");
        return this;
    }
}

/// <summary>
/// Picks the next token from logits: greedy (argmax) at temperature 0, else temperature, top-k and
/// top-p (nucleus) sampling from a seeded xorshift64* generator, so a seed fixes the text on every
/// platform and runtime. Speculative decoding goes through the same instance: <see cref="Distribution"/>
/// shapes the draft's and the target's logits alike, and <see cref="Verify"/> is the accept/reject rule.
/// </summary>
public sealed class Sampler
{
    private readonly GenerationOptions _o;
    private ulong _state;
    private int[] _order = [];
    private float[] _probs = [], _sorted = [];

    /// <summary>A sampler for <paramref name="options"/>.</summary>
    public Sampler(GenerationOptions options)
    {
        _o = options.Validated();
        _state = options.Seed ?? (ulong)Random.Shared.NextInt64();
        if (_state == 0) _state = 0x9E3779B97F4A7C15; // xorshift has no zero state
    }

    /// <summary>Whether the options make decoding greedy (temperature 0 or top-k 1): the next token is the argmax.</summary>
    public bool IsGreedy => _o.Temperature == 0 || _o.TopK == 1;

    /// <summary>The next token for <paramref name="logits"/> (one row of the vocabulary).</summary>
    public int Next(ReadOnlySpan<float> logits)
    {
        if (IsGreedy) return TensorPrimitives.IndexOfMax(logits);
        if (_probs.Length != logits.Length) _probs = new float[logits.Length];
        Distribution(logits, _probs);
        return Draw(_probs);
    }

    /// <summary>
    /// The distribution <see cref="Next"/> samples from: softmax of logits / temperature, cut to the top-k, then to
    /// the smallest nucleus reaching top-p, renormalized (zero outside). Greedy options give the one-hot argmax.
    /// </summary>
    public void Distribution(ReadOnlySpan<float> logits, Span<float> probs)
    {
        int n = logits.Length;
        if (probs.Length != n) throw new ArgumentException($"probs must hold {n} floats.", nameof(probs));
        if (IsGreedy)
        {
            probs.Clear();
            probs[TensorPrimitives.IndexOfMax(logits)] = 1;
            return;
        }
        TensorPrimitives.Divide(logits, _o.Temperature, probs);
        StableSoftMax.Compute(probs, probs);
        int keep = _o.TopK > 0 ? Math.Min(_o.TopK, n) : n;
        if (keep == n && _o.TopP >= 1) return;

        // Candidates by descending probability (ties by id, so the cut is deterministic), cut by top-k then top-p.
        if (_order.Length != n) { _order = new int[n]; _sorted = new float[n]; }
        for (int i = 0; i < n; i++) _order[i] = i;
        var p = _sorted;
        probs.CopyTo(p);
        Array.Sort(_order, (a, b) => p[b] != p[a] ? p[b].CompareTo(p[a]) : a.CompareTo(b));
        if (_o.TopP < 1)
        {
            float cumulative = 0;
            for (int i = 0; i < keep; i++)
            {
                cumulative += p[_order[i]];
                if (cumulative >= _o.TopP) { keep = i + 1; break; }
            }
        }
        float total = 0;
        for (int i = 0; i < keep; i++) total += p[_order[i]];
        probs.Clear();
        for (int i = 0; i < keep; i++) probs[_order[i]] = p[_order[i]] / total;
    }

    /// <summary>A token drawn from <paramref name="weights"/> (non-negative, not necessarily summing to 1).</summary>
    public int Draw(ReadOnlySpan<float> weights)
    {
        float total = TensorPrimitives.Sum(weights);
        float r = NextFloat() * total, acc = 0;
        int last = 0;
        for (int i = 0; i < weights.Length; i++)
        {
            if (weights[i] <= 0) continue;
            acc += weights[i];
            last = i;
            if (r < acc) return i;
        }
        return last; // rounding: the draw fell past the last partial sum
    }

    /// <summary>
    /// The speculative accept/reject rule for a token <paramref name="drafted"/> drawn from <paramref name="draft"/>:
    /// keep it with probability min(1, target[x] / draft[x]); otherwise draw from norm(max(0, target − draft)). The
    /// token returned is then distributed exactly as <paramref name="target"/>. Greedy: kept when it is the target's
    /// argmax, else the argmax. <paramref name="residual"/> is scratch of the vocabulary's size.
    /// </summary>
    public (bool Accepted, int Token) Verify(ReadOnlySpan<float> draft, ReadOnlySpan<float> target, int drafted, Span<float> residual)
    {
        if (IsGreedy)
        {
            int best = TensorPrimitives.IndexOfMax(target);
            return (best == drafted, best);
        }
        float pd = draft[drafted], pt = target[drafted];
        if (pt >= pd || NextFloat() * pd < pt) return (true, drafted);
        TensorPrimitives.Subtract(target, draft, residual);
        TensorPrimitives.Max(residual, 0f, residual);
        // A rejection implies target > draft somewhere; an all-zero residual can only come from rounding.
        return (false, TensorPrimitives.Sum(residual) > 0 ? Draw(residual) : Draw(target));
    }

    /// <summary>A uniform float in [0, 1).</summary>
    public float NextFloat()
    {
        _state ^= _state >> 12;
        _state ^= _state << 25;
        _state ^= _state >> 27;
        return ((_state * 0x2545F4914F6CDD1DUL) >> 40) / 16777216f;
    }
}
