using System.Numerics.Tensors;

namespace AnyPrecML.Kernels;

/// <summary>
/// Softmax that subtracts the maximum before exponentiating. <see cref="TensorPrimitives.SoftMax(ReadOnlySpan{float}, Span{float})"/>
/// exponentiates the inputs as they are, and e^x overflows float past x ≈ 88.7: it returned NaN for [100, 0, 95]. Attention
/// scores get there (stories260K, fed random tokens, reached them at position 253 and the reference engine's logits turned
/// NaN), and so do sampling logits divided by a low temperature.
/// </summary>
public static class StableSoftMax
{
    /// <summary>destination[i] = e^(x[i] − max x) / Σ e^(x[j] − max x); <paramref name="x"/> and <paramref name="destination"/> may be the same span.</summary>
    /// <exception cref="ArgumentException"><paramref name="x"/> is empty or <paramref name="destination"/> shorter than it.</exception>
    public static void Compute(ReadOnlySpan<float> x, Span<float> destination)
    {
        var (_, sum) = Exponentiate(x, destination);
        TensorPrimitives.Divide(destination[..x.Length], sum, destination[..x.Length]);
    }

    /// <summary>
    /// The softmax before its division: destination[i] = e^(x[i] − max x); returns max x and Σ destination. Parts of
    /// one softmax taken apart (attention split across threads) are merged with them.
    /// </summary>
    public static (float Max, float Sum) Exponentiate(ReadOnlySpan<float> x, Span<float> destination)
    {
        if (x.IsEmpty) throw new ArgumentException("softmax of an empty span.", nameof(x));
        if (destination.Length < x.Length) throw new ArgumentException($"destination holds {destination.Length} floats; {x.Length} needed.", nameof(destination));
        destination = destination[..x.Length];
        float max = TensorPrimitives.Max(x);
        TensorPrimitives.Subtract(x, max, destination);
        TensorPrimitives.Exp(destination, destination);
        return (max, TensorPrimitives.Sum(destination));
    }
}
