using AnyPrecML.Models;

namespace AnyPrecML.Generation;

/// <summary>
/// Key/value caches of finished generations, kept for the next prompts of one engine at one width: a prompt that starts
/// with tokens a kept cache already holds (the conversation so far in a chat, a shared system prompt) reuses them and
/// prefills only the rest, so a chat's next turn costs its new tokens, not the whole history. <see cref="TextGenerator"/>
/// takes one (<see cref="TextGenerator.PromptCache"/>); the chat client and <c>serve</c> keep one per width.
/// </summary>
/// <remarks>
/// A reused position holds what the call that wrote it computed: a decode step, or a prompt of
/// <see cref="Kernels.CausalAttention.BlockedTokens"/> or more attended in the blocked products, whose sums run in another
/// order. With the CPU engine's int8 kernels a continuation gives bit for bit what a fresh run gives when its reused
/// positions were written as a fresh run of the new prompt would write them (a conversation whose prompts stay under that
/// length; a prompt repeated after a fresh run of it; tests hold both); otherwise its attention sums can differ in their last
/// bits, and a greedy choice at a near tie with them.
/// A generation that continues a kept cache takes it whole; one that parts from it midway gets a copy of the shared
/// positions, so two generations never share a cache and one conversation never cuts another's short. The least recently
/// used entry goes when more than
/// <see cref="MaxEntries"/> are kept; each holds its cache's memory (capacity × layers × 2 × KV width × 2 bytes in bf16).
/// </remarks>
public sealed class PromptCache
{
    private readonly object _gate = new();
    private readonly List<Entry> _entries = [];
    private long _clock, _hits, _reused;

    /// <summary>A cache keeping up to <paramref name="maxEntries"/> finished generations' key/value caches.</summary>
    public PromptCache(int maxEntries = 4)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxEntries, 1);
        MaxEntries = maxEntries;
    }

    /// <summary>Most caches kept.</summary>
    public int MaxEntries { get; }
    /// <summary>Caches kept now.</summary>
    public int Count { get { lock (_gate) return _entries.Count; } }
    /// <summary>Prompts that reused a kept cache.</summary>
    public long Hits => Interlocked.Read(ref _hits);
    /// <summary>Prompt tokens not prefilled because a kept cache held them.</summary>
    public long ReusedTokens => Interlocked.Read(ref _reused);

    /// <summary>Drops every kept cache.</summary>
    public void Clear()
    {
        lock (_gate) _entries.Clear();
    }

    /// <summary>
    /// A cache holding the longest start <paramref name="prompt"/>'s tokens but its last (which a generation feeds as a
    /// decode step) share with a kept one; null when none shares two tokens or more (every prompt starts with BOS). When
    /// the prompt continues a kept cache whole (a conversation's next turn), that cache leaves the pool and is returned,
    /// copied into a larger one from <paramref name="create"/> when it lacks room for <paramref name="capacity"/>
    /// positions. When the prompt parts from it midway (another conversation after the same system prompt or template),
    /// the shared positions are copied into a new cache and the kept one stays for its own conversation.
    /// </summary>
    internal (KvCache Cache, int Reused)? Take(ReadOnlySpan<int> prompt, int capacity, Func<int, KvCache> create)
    {
        var usable = prompt[..^1];
        KvCache cache;
        int shared = 0;
        lock (_gate)
        {
            int best = -1;
            for (int i = 0; i < _entries.Count; i++)
            {
                int length = usable.CommonPrefixLength(_entries[i].Tokens);
                // Ties go to a cache the prompt continues whole (no copy).
                if (length > shared || (length == shared && best >= 0 && length == _entries[i].Tokens.Length && length < _entries[best].Tokens.Length))
                    (best, shared) = (i, length);
            }
            if (best < 0 || shared < 2) return null;
            var entry = _entries[best];
            if (shared == entry.Tokens.Length)
            {
                _entries.RemoveAt(best);
                cache = entry.Cache;
            }
            else
            {
                // Copied under the lock: no other Take may take the kept cache meanwhile.
                cache = create(capacity);
                entry.Cache.CopyTo(cache, shared);
                entry.LastUse = ++_clock;
            }
        }
        if (cache.Capacity < capacity)
        {
            var larger = create(capacity);
            cache.CopyTo(larger, shared);
            cache = larger;
        }
        Interlocked.Increment(ref _hits);
        Interlocked.Add(ref _reused, shared);
        return (cache, shared);
    }

    /// <summary>Keeps <paramref name="cache"/>, which holds exactly <paramref name="tokens"/>, for later prompts.</summary>
    internal void Return(KvCache cache, int[] tokens)
    {
        if (cache.Length != tokens.Length) throw new ArgumentException($"the cache holds {cache.Length} positions, not the {tokens.Length} tokens given.", nameof(tokens));
        lock (_gate)
        {
            _entries.Add(new Entry(tokens, cache, ++_clock));
            if (_entries.Count > MaxEntries)
            {
                int oldest = 0;
                for (int i = 1; i < _entries.Count; i++) if (_entries[i].LastUse < _entries[oldest].LastUse) oldest = i;
                _entries.RemoveAt(oldest);
            }
        }
    }

    private sealed class Entry(int[] tokens, KvCache cache, long lastUse)
    {
        public readonly int[] Tokens = tokens;
        public readonly KvCache Cache = cache;
        public long LastUse = lastUse;
    }
}
