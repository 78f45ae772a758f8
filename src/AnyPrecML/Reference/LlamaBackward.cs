using System.Numerics;
using System.Numerics.Tensors;
using AnyPrecML.Models;

namespace AnyPrecML.Reference;

/// <summary>
/// Gradients of the next-token cross-entropy of one sequence with respect to every block linear
/// weight, for the Fisher sensitivity. A plain forward pass that keeps the activations of one
/// sequence, then the backward pass through the head, final norm and each block in reverse
/// (SwiGLU, RMSNorm, attention with RoPE and grouped-query heads). Generic over the float type:
/// float for calibration, double for the finite-difference check of the gradients.
/// Activations live only for one sequence; each layer's weight gradient is handed to the caller
/// as soon as it is complete, so the caller can square-accumulate it and drop it.
/// </summary>
public sealed class LlamaBackward<T> where T : unmanaged, IFloatingPointIeee754<T>
{
    private readonly LlamaConfig _c;
    private readonly T[] _emb, _head, _finalNorm;
    private readonly Block[] _blocks;

    private sealed record Block(T[] AttNorm, T[] Wq, T[] Wk, T[] Wv, T[] Wo, T[] FfnNorm, T[] Gate, T[] Up, T[] Down)
    {
        public T[] Linear(string part) => part switch
        {
            "self_attn.q_proj" => Wq, "self_attn.k_proj" => Wk, "self_attn.v_proj" => Wv, "self_attn.o_proj" => Wo,
            "mlp.gate_proj" => Gate, "mlp.up_proj" => Up, _ => Down,
        };
    }

    /// <summary>Builds the pass over <paramref name="w"/> (float weights are shared, not copied, when T is float).</summary>
    public LlamaBackward(LlamaWeights w)
    {
        _c = w.Config;
        _emb = Convert(w.Embedding);
        _head = ReferenceEquals(w.Head, w.Embedding) ? _emb : Convert(w.Head);
        _finalNorm = Convert(w.FinalNorm);
        _blocks = w.Blocks.Select(b => new Block(Convert(b.AttentionNorm), Convert(b.Wq), Convert(b.Wk), Convert(b.Wv), Convert(b.Wo),
            Convert(b.FfnNorm), Convert(b.Gate), Convert(b.Up), Convert(b.Down))).ToArray();
    }

    private static T[] Convert(float[] a) => typeof(T) == typeof(float) ? (T[])(object)a : Array.ConvertAll(a, T.CreateChecked);

    /// <summary>The weight of block linear <paramref name="part"/> in layer <paramref name="layer"/> (for tests that perturb it).</summary>
    public T[] Weight(int layer, string part) => _blocks[layer].Linear(part);

    /// <summary>Mean cross-entropy of predicting tokens[1..] from tokens[..^1].</summary>
    public T Loss(ReadOnlySpan<int> tokens) => Run(tokens, null);

    /// <summary>
    /// Computes the loss and, layer by layer from the last, the gradient of the loss for every block
    /// linear, passed to <paramref name="onGradient"/>(layer, part, dW [rows, cols]); the array is reused after the call returns.
    /// </summary>
    public T Gradients(ReadOnlySpan<int> tokens, Action<int, string, T[]> onGradient) => Run(tokens, onGradient ?? throw new ArgumentNullException(nameof(onGradient)));

    private sealed class Saved
    {
        public required T[] X, R1, Xb, Q, K, V, P, O, XMid, R2, Xb2, G, U, H;
    }

    private T Run(ReadOnlySpan<int> tokens, Action<int, string, T[]>? onGradient)
    {
        var c = _c;
        int n = tokens.Length - 1, d = c.Dim, hd = c.HeadDim, hidden = c.HiddenDim, vocab = c.VocabSize;
        if (n < 1) throw new ArgumentException("a sequence needs at least two tokens.", nameof(tokens));
        if (n > c.MaxSeqLen) throw new ArgumentException($"{n} positions exceed the model's context of {c.MaxSeqLen}.", nameof(tokens));
        foreach (int t in tokens) if ((uint)t >= (uint)vocab) throw new ArgumentOutOfRangeException(nameof(tokens), $"token id {t} is outside the vocabulary of {vocab}.");
        var (cos, sin) = Rope(n);

        // ---- forward, keeping what the backward needs
        var x = new T[n * d];
        for (int t = 0; t < n; t++) _emb.AsSpan(tokens[t] * d, d).CopyTo(x.AsSpan(t * d, d));
        var saved = new Saved[c.Layers];
        for (int l = 0; l < c.Layers; l++)
        {
            var b = _blocks[l];
            var s = new Saved
            {
                X = x, R1 = new T[n], Xb = new T[n * d], Q = new T[n * c.QDim], K = new T[n * c.KvDim], V = new T[n * c.KvDim],
                P = new T[c.Heads * n * n], O = new T[n * c.QDim], XMid = new T[n * d], R2 = new T[n], Xb2 = new T[n * d],
                G = new T[n * hidden], U = new T[n * hidden], H = new T[n * hidden],
            };
            RmsNorm(x, b.AttNorm, s.Xb, s.R1, n, d);
            MatMul(s.Xb, b.Wq, s.Q, n, d, c.QDim);
            MatMul(s.Xb, b.Wk, s.K, n, d, c.KvDim);
            MatMul(s.Xb, b.Wv, s.V, n, d, c.KvDim);
            Rotate(s.Q, n, c.Heads, cos, sin, inverse: false);
            Rotate(s.K, n, c.KvHeads, cos, sin, inverse: false);
            AttentionForward(s, n);
            var y = new T[n * d];
            MatMul(s.O, b.Wo, y, n, c.QDim, d);
            TensorPrimitives.Add(x, y, s.XMid);
            RmsNorm(s.XMid, b.FfnNorm, s.Xb2, s.R2, n, d);
            MatMul(s.Xb2, b.Gate, s.G, n, d, hidden);
            MatMul(s.Xb2, b.Up, s.U, n, d, hidden);
            for (int i = 0; i < s.H.Length; i++) s.H[i] = Silu(s.G[i]) * s.U[i];
            var z = new T[n * d];
            MatMul(s.H, b.Down, z, n, hidden, d);
            var next = new T[n * d];
            TensorPrimitives.Add(s.XMid, z, next);
            saved[l] = s;
            x = next;
        }
        var rf = new T[n];
        var nf = new T[n * d];
        RmsNorm(x, _finalNorm, nf, rf, n, d);

        // ---- loss, and its gradient with respect to the logits: (softmax - onehot) / n
        T loss = T.Zero;
        var dlogits = onGradient is null ? null : new T[n * vocab];
        var logits = new T[vocab];
        for (int t = 0; t < n; t++)
        {
            for (int v = 0; v < vocab; v++) logits[v] = TensorPrimitives.Dot<T>(nf.AsSpan(t * d, d), _head.AsSpan(v * d, d));
            T max = TensorPrimitives.Max<T>(logits), sum = T.Zero;
            for (int v = 0; v < vocab; v++) sum += T.Exp(logits[v] - max);
            int target = tokens[t + 1];
            loss += T.Log(sum) + max - logits[target];
            if (dlogits is null) continue;
            for (int v = 0; v < vocab; v++) dlogits[t * vocab + v] = T.Exp(logits[v] - max) / sum / T.CreateChecked(n);
            dlogits[t * vocab + target] -= T.One / T.CreateChecked(n);
        }
        loss /= T.CreateChecked(n);
        if (onGradient is null) return loss;

        // ---- backward
        var dnf = new T[n * d];
        MatMulTransposed(dlogits!, _head, dnf, n, vocab, d);
        var dx = new T[n * d];
        RmsNormBackward(dnf, x, _finalNorm, rf, dx, n, d);
        // One gradient buffer per weight size (q/o, k/v, the MLP matrices), reused across layers.
        var buffers = new Dictionary<int, T[]>();
        void Grad(int layer, string part, T[] dy, T[] input, int rows, int cols)
        {
            if (!buffers.TryGetValue(rows * cols, out var dW)) buffers[rows * cols] = dW = new T[rows * cols];
            WeightGradient(dy, input, dW, n, rows, cols);
            onGradient!(layer, part, dW);
        }
        for (int l = c.Layers - 1; l >= 0; l--)
        {
            var b = _blocks[l];
            var s = saved[l];
            // x_{l+1} = x_mid + down(silu(gate) * up)
            Grad(l, "mlp.down_proj", dx, s.H, d, hidden);
            var dh = new T[n * hidden];
            MatMulTransposed(dx, b.Down, dh, n, d, hidden);
            var dg = new T[n * hidden];
            var du = new T[n * hidden];
            for (int i = 0; i < dh.Length; i++)
            {
                T g = s.G[i], sig = T.One / (T.One + T.Exp(-g));
                du[i] = dh[i] * g * sig;
                dg[i] = dh[i] * s.U[i] * sig * (T.One + g * (T.One - sig));
            }
            Grad(l, "mlp.gate_proj", dg, s.Xb2, hidden, d);
            Grad(l, "mlp.up_proj", du, s.Xb2, hidden, d);
            var dxb2 = new T[n * d];
            MatMulTransposed(dg, b.Gate, dxb2, n, hidden, d);
            MatMulTransposed(du, b.Up, dxb2, n, hidden, d, accumulate: true);
            var dxMid = (T[])dx.Clone();
            RmsNormBackward(dxb2, s.XMid, b.FfnNorm, s.R2, dxMid, n, d);

            // x_mid = x + o_proj(attention)
            Grad(l, "self_attn.o_proj", dxMid, s.O, d, c.QDim);
            var dO = new T[n * c.QDim];
            MatMulTransposed(dxMid, b.Wo, dO, n, d, c.QDim);
            var dq = new T[n * c.QDim];
            var dk = new T[n * c.KvDim];
            var dv = new T[n * c.KvDim];
            AttentionBackward(s, dO, dq, dk, dv, n);
            Rotate(dq, n, c.Heads, cos, sin, inverse: true);
            Rotate(dk, n, c.KvHeads, cos, sin, inverse: true);
            Grad(l, "self_attn.q_proj", dq, s.Xb, c.QDim, d);
            Grad(l, "self_attn.k_proj", dk, s.Xb, c.KvDim, d);
            Grad(l, "self_attn.v_proj", dv, s.Xb, c.KvDim, d);
            var dxb = new T[n * d];
            MatMulTransposed(dq, b.Wq, dxb, n, c.QDim, d);
            MatMulTransposed(dk, b.Wk, dxb, n, c.KvDim, d, accumulate: true);
            MatMulTransposed(dv, b.Wv, dxb, n, c.KvDim, d, accumulate: true);
            dx = dxMid;
            RmsNormBackward(dxb, s.X, b.AttNorm, s.R1, dx, n, d);
            saved[l] = null!; // this layer's activations are no longer needed
        }
        return loss;
    }

    private static T Silu(T g) => g / (T.One + T.Exp(-g));

    private (T[] Cos, T[] Sin) Rope(int n)
    {
        int half = _c.HeadDim / 2;
        var cos = new T[n * half];
        var sin = new T[n * half];
        for (int j = 0; j < half; j++)
        {
            // The same float arithmetic as the reference engine, so float runs agree with it.
            float freq = 1f / MathF.Pow(_c.RopeTheta, 2f * j / _c.HeadDim);
            for (int t = 0; t < n; t++)
            {
                T angle = typeof(T) == typeof(float) ? T.CreateChecked(t * freq) : T.CreateChecked(t) / T.Pow(T.CreateChecked(_c.RopeTheta), T.CreateChecked(2.0 * j / _c.HeadDim));
                cos[t * half + j] = T.Cos(angle);
                sin[t * half + j] = T.Sin(angle);
            }
        }
        return (cos, sin);
    }

    /// <summary>Rotates pairs by +angle (forward) or −angle (the backward of a rotation is its inverse).</summary>
    private void Rotate(T[] v, int n, int heads, T[] cos, T[] sin, bool inverse)
    {
        int hd = _c.HeadDim, half = hd / 2;
        bool interleaved = _c.RopeLayout == RopeLayout.Interleaved;
        for (int t = 0; t < n; t++)
            for (int h = 0; h < heads; h++)
                for (int j = 0; j < half; j++)
                {
                    int i0 = (t * heads + h) * hd + (interleaved ? 2 * j : j), i1 = interleaved ? i0 + 1 : i0 + half;
                    T co = cos[t * half + j], si = inverse ? -sin[t * half + j] : sin[t * half + j];
                    T a = v[i0], b = v[i1];
                    v[i0] = a * co - b * si;
                    v[i1] = a * si + b * co;
                }
    }

    private void AttentionForward(Saved s, int n)
    {
        var c = _c;
        int hd = c.HeadDim, group = c.Heads / c.KvHeads;
        T scale = T.One / T.Sqrt(T.CreateChecked(hd));
        for (int h = 0; h < c.Heads; h++)
        {
            int g = h / group;
            for (int t = 0; t < n; t++)
            {
                var p = s.P.AsSpan((h * n + t) * n, t + 1);
                var q = s.Q.AsSpan((t * c.Heads + h) * hd, hd);
                for (int u = 0; u <= t; u++) p[u] = TensorPrimitives.Dot<T>(q, s.K.AsSpan((u * c.KvHeads + g) * hd, hd)) * scale;
                T max = TensorPrimitives.Max<T>(p), sum = T.Zero;
                for (int u = 0; u <= t; u++) { p[u] = T.Exp(p[u] - max); sum += p[u]; }
                for (int u = 0; u <= t; u++) p[u] /= sum;
                var o = s.O.AsSpan((t * c.Heads + h) * hd, hd);
                for (int u = 0; u <= t; u++) TensorPrimitives.MultiplyAdd<T>(s.V.AsSpan((u * c.KvHeads + g) * hd, hd), p[u], o, o);
            }
        }
    }

    private void AttentionBackward(Saved s, T[] dO, T[] dq, T[] dk, T[] dv, int n)
    {
        var c = _c;
        int hd = c.HeadDim, group = c.Heads / c.KvHeads;
        T scale = T.One / T.Sqrt(T.CreateChecked(hd));
        var dp = new T[n];
        for (int h = 0; h < c.Heads; h++)
        {
            int g = h / group;
            for (int t = 0; t < n; t++)
            {
                var p = s.P.AsSpan((h * n + t) * n, t + 1);
                var dot = dO.AsSpan((t * c.Heads + h) * hd, hd);
                // o_t = Σ_u p_u v_u: dp_u = do_t · v_u, dv_u += p_u do_t
                T inner = T.Zero;
                for (int u = 0; u <= t; u++)
                {
                    var vu = s.V.AsSpan((u * c.KvHeads + g) * hd, hd);
                    dp[u] = TensorPrimitives.Dot<T>(dot, vu);
                    inner += p[u] * dp[u];
                    var dvu = dv.AsSpan((u * c.KvHeads + g) * hd, hd);
                    TensorPrimitives.MultiplyAdd<T>(dot, p[u], dvu, dvu);
                }
                // softmax: ds_u = p_u (dp_u - Σ p dp); s_u = q_t · k_u · scale
                var qt = s.Q.AsSpan((t * c.Heads + h) * hd, hd);
                var dqt = dq.AsSpan((t * c.Heads + h) * hd, hd);
                for (int u = 0; u <= t; u++)
                {
                    T ds = p[u] * (dp[u] - inner) * scale;
                    TensorPrimitives.MultiplyAdd<T>(s.K.AsSpan((u * c.KvHeads + g) * hd, hd), ds, dqt, dqt);
                    var dku = dk.AsSpan((u * c.KvHeads + g) * hd, hd);
                    TensorPrimitives.MultiplyAdd<T>(qt, ds, dku, dku);
                }
            }
        }
    }

    /// <summary>y = x · r · w with r = 1/sqrt(mean(x²) + eps), keeping r per row.</summary>
    private void RmsNorm(T[] x, T[] w, T[] y, T[] r, int n, int d)
    {
        T eps = T.CreateChecked(_c.RmsNormEps);
        for (int t = 0; t < n; t++)
        {
            var row = x.AsSpan(t * d, d);
            r[t] = T.One / T.Sqrt(TensorPrimitives.SumOfSquares<T>(row) / T.CreateChecked(d) + eps);
            var o = y.AsSpan(t * d, d);
            TensorPrimitives.Multiply<T>(row, r[t], o);
            TensorPrimitives.Multiply<T>(o, w, o);
        }
    }

    /// <summary>dx += r·dn − (r³/d)·x·Σ(dn·x), where dn = dy·w.</summary>
    private static void RmsNormBackward(T[] dy, T[] x, T[] w, T[] r, T[] dx, int n, int d)
    {
        var dn = new T[d];
        for (int t = 0; t < n; t++)
        {
            TensorPrimitives.Multiply<T>(dy.AsSpan(t * d, d), w, dn);
            var xr = x.AsSpan(t * d, d);
            T rt = r[t], k = rt * rt * rt / T.CreateChecked(d) * TensorPrimitives.Dot<T>(dn, xr);
            var o = dx.AsSpan(t * d, d);
            for (int i = 0; i < d; i++) o[i] += rt * dn[i] - k * xr[i];
        }
    }

    /// <summary>y[t, r] = x[t, :] · W[r, :].</summary>
    private static void MatMul(T[] x, T[] w, T[] y, int n, int cols, int rows) =>
        Parallel.For(0, rows, r =>
        {
            var wr = w.AsSpan(r * cols, cols);
            for (int t = 0; t < n; t++) y[t * rows + r] = TensorPrimitives.Dot<T>(x.AsSpan(t * cols, cols), wr);
        });

    /// <summary>dx[t, :] (+)= Σ_r dy[t, r] · W[r, :] (the gradient through y = x·Wᵀ).</summary>
    private static void MatMulTransposed(T[] dy, T[] w, T[] dx, int n, int rows, int cols, bool accumulate = false) =>
        Parallel.For(0, n, t =>
        {
            var o = dx.AsSpan(t * cols, cols);
            if (!accumulate) o.Clear();
            for (int r = 0; r < rows; r++)
            {
                T g = dy[t * rows + r];
                if (g != T.Zero) TensorPrimitives.MultiplyAdd<T>(w.AsSpan(r * cols, cols), g, o, o);
            }
        });

    /// <summary>dW[r, :] = Σ_t dy[t, r] · x[t, :].</summary>
    private static void WeightGradient(T[] dy, T[] x, T[] dW, int n, int rows, int cols) =>
        Parallel.For(0, rows, r =>
        {
            var o = dW.AsSpan(r * cols, cols);
            o.Clear();
            for (int t = 0; t < n; t++)
            {
                T g = dy[t * rows + r];
                if (g != T.Zero) TensorPrimitives.MultiplyAdd<T>(x.AsSpan(t * cols, cols), g, o, o);
            }
        });
}
